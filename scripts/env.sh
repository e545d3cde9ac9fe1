# Source me: puts perf_analyzer's libcudart on LD_LIBRARY_PATH and pip's bin dir on PATH.
_tvl_py=${PYTHON:-python3}
_tvl_cudart=$($_tvl_py -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))" 2>/dev/null || true)
[ -n "$_tvl_cudart" ] && export LD_LIBRARY_PATH="$_tvl_cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
_tvl_bin=$($_tvl_py -c "import sysconfig; print(sysconfig.get_path('scripts'))")
case ":$PATH:" in *":$_tvl_bin:"*) ;; *) export PATH="$_tvl_bin:$PATH" ;; esac
unset _tvl_py _tvl_cudart _tvl_bin
