"""client/grounding.py without a server: Qwen's grounding answers parsed (fences, one object, text
around, a list cut short, Qwen2-VL's box tokens), mapped to the original image's pixels by each
family's grid, and drawn with Pillow. The live side (sizes from a real server, `tritonvl ground`) is
tests/server/test_media_sizes.py."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tritonvl.client.grounding import (
    COLORS,
    Grounding,
    draw,
    ground,
    grounding_prompt,
    parse_grounding,
    to_original,
)
from tritonvl.client.result import Media, MediaSize
from tritonvl.client.rules.media import coordinates_of

# A 1000x700 image under a budget of 50000 pixels: Qwen's smart_resize gives 252x168 (checked
# against transformers' own function below), so the two grids differ on both axes.
SIZE = MediaSize("image", 1000, 700, 252, 168)


def media(family: str) -> Media:
    return Media(family, coordinates_of(family), (SIZE,))


def test_the_resize_of_the_example_is_qwens():
    smart_resize = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    assert smart_resize(700, 1000, factor=28, min_pixels=3136, max_pixels=50000) == (168, 252)


def test_each_family_has_its_grid():
    assert coordinates_of("qwen2_5_vl") == "absolute"
    assert {coordinates_of(f) for f in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe")} == {"relative_1000"}
    with pytest.raises(ValueError, match="unknown model family"):
        coordinates_of("llava")


def test_qwen2_5_vl_answers_in_pixels_of_the_resized_image():
    # the car covers the middle half of the image: on the 252x168 image the model saw, 63..189 x 42..126
    answer = '```json\n[\n\t{"bbox_2d": [63, 42, 189, 126], "label": "the red car"}\n]\n```'
    (car,) = ground(answer, media("qwen2_5_vl"))
    assert car.label == "the red car"
    assert car.bbox == pytest.approx((250.0, 175.0, 750.0, 525.0))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_qwen2_and_qwen3_answer_on_a_0_to_1000_grid(family):
    (car,) = ground('[{"bbox_2d": [250, 250, 750, 750], "label": "car"}]', media(family))
    assert car.bbox == pytest.approx((250.0, 175.0, 750.0, 525.0))


def test_the_grid_matters_and_family_overrides_the_servers():
    answer = '{"bbox_2d": [63, 42, 189, 126]}'
    as_pixels = ground(answer, media("qwen2_5_vl"))[0].bbox
    as_grid = ground(answer, media("qwen2_5_vl"), family="qwen3_vl")[0].bbox
    assert as_grid == pytest.approx((63.0, 29.4, 189.0, 88.2)) and as_grid != pytest.approx(as_pixels)


def test_points_map_like_boxes_and_everything_is_clamped_to_the_image():
    answer = '[{"point_2d": [126, 84], "label": "centre"}, {"bbox_2d": [-5, 10, 400, 300], "label": "spill"}]'
    centre, spill = ground(answer, media("qwen2_5_vl"))
    assert centre.point == pytest.approx((500.0, 350.0)) and centre.bbox is None
    assert spill.bbox == pytest.approx((0.0, 10 * 700 / 168, 1000.0, 700.0))


def test_tolerant_parsing():
    box = {"bbox_2d": [1, 2, 30, 40], "label": "a"}
    one = json.dumps(box)
    cases = {
        "fenced list": f"Here:\n```json\n[{one}]\n```\nDone.",
        "fence never closed (max_tokens)": f"```json\n[{one}",
        "one object": one,
        "text around": f"The box is {one} as asked. [sic]",
        "trailing garbage": f"[{one}]]]}}}} <|im_end|>",
        "nested list": f"[[{one}]]",
    }
    for name, text in cases.items():
        assert parse_grounding(text) == [Grounding("a", (1.0, 2.0, 30.0, 40.0))], name


def test_a_list_cut_short_keeps_its_complete_items():
    text = ('```json\n[\n {"bbox_2d": [1, 2, 3, 4], "label": "one"},\n {"point_2d": [5, 6], "label": "two"},\n'
            ' {"bbox_2d": [7, 8, 9')
    assert [(g.label, g.bbox, g.point) for g in parse_grounding(text)] == [
        ("one", (1.0, 2.0, 3.0, 4.0), None), ("two", None, (5.0, 6.0))]


def test_objects_one_after_another_and_invalid_items_dropped():
    text = ('{"bbox_2d": [1, 2, 3, 4], "label": "x"}\n{"bbox_2d": [1, 2, 3], "label": "three numbers"}\n'
            '{"bbox_2d": [true, 2, 3, 4]}\n{"point_2d": ["1", 2]}\n{"label": "no box"}\n'
            '{"bbox_2d": [30, 40, 10, 20], "label": "corners swapped", "color": "red"}')
    items = parse_grounding(text)
    assert [(g.label, g.bbox) for g in items] == [("x", (1.0, 2.0, 3.0, 4.0)), ("corners swapped", (10.0, 20.0, 30.0, 40.0))]
    assert items[1].to_dict() == {"bbox_2d": [10.0, 20.0, 30.0, 40.0], "label": "corners swapped", "color": "red"}


def test_qwen2_vl_box_tokens():
    with_tokens = "<|object_ref_start|>the car<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|>"
    assert parse_grounding(with_tokens) == [Grounding("the car", (250.0, 250.0, 750.0, 750.0))]
    skipped = "the car(250, 250), (750, 750)"  # the same answer with special tokens skipped
    assert parse_grounding(skipped) == [Grounding(None, (250.0, 250.0, 750.0, 750.0))]
    (car,) = ground(with_tokens, media("qwen2_vl"))
    assert car.bbox == pytest.approx((250.0, 175.0, 750.0, 525.0))


def test_nothing_to_find():
    for text in ("", "I cannot see a car.", "[1, 2, 3]", '{"label": "x"}', "```json\n```"):
        assert parse_grounding(text) == []


def test_ground_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="no media sizes"):
        ground("{}", None)
    with pytest.raises(ValueError, match="give family="):
        ground("{}", Media(None, None, (SIZE,)))
    with pytest.raises(ValueError, match="image 1: the request had 1 image"):
        ground("{}", media("qwen3_vl"), image=1)
    with pytest.raises(ValueError, match="coordinates 'pixels'"):
        to_original([], SIZE, "pixels")


def test_media_from_the_servers_json():
    raw = json.dumps({"family": "qwen3_vl", "coordinates": "relative_1000",
                      "images": [{"width": 1000, "height": 700, "resized_width": 992, "resized_height": 704}],
                      "videos": [{"width": 112, "height": 84, "resized_width": 128, "resized_height": 96,
                                  "frame_times": [0, 0.5]}]})
    m = Media.from_json(raw)
    assert m.family == "qwen3_vl" and m.images[0].original == (1000, 700) and m.images[0].resized == (992, 704)
    assert m.videos[0].kind == "video" and m.videos[0].frame_times == (0.0, 0.5)
    with pytest.raises(ValueError, match="media_sizes"):
        Media.from_json('{"images": [{"width": 1}]}')


def png(width: int, height: int, exif_orientation: int | None = None) -> bytes:
    img = Image.new("RGB", (width, height), (128, 128, 128))
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def test_draw_boxes_points_and_labels_in_distinct_colours(tmp_path):
    items = ground('[{"bbox_2d": [63, 42, 189, 126], "label": "car"}, {"bbox_2d": [10, 10, 40, 30]},'
                   ' {"point_2d": [200, 140], "label": "dot"}]', media("qwen2_5_vl"))
    out = tmp_path / "boxed.png"
    draw(png(1000, 700), items, out)
    img = Image.open(out).convert("RGB")
    assert img.size == (1000, 700)
    assert img.getpixel((750, 350)) == COLORS[0] and img.getpixel((500, 525)) == COLORS[0]  # right, bottom edges
    assert img.getpixel((500, 350)) == (128, 128, 128)  # a box is an outline
    assert img.getpixel((int(40 * 1000 / 252), 60)) == COLORS[1] != COLORS[0]
    x, y = (round(v) for v in items[2].point)
    assert img.getpixel((x, y)) == COLORS[2]
    assert img.getpixel((250, 175 - 8)) == COLORS[0]  # the label's background sits on the box's corner


def test_draw_turns_the_image_upright_as_the_server_does():
    # stored 300x200 with EXIF "rotate 90": viewers and the server's intake see 200x300
    img = draw(png(300, 200, exif_orientation=6), [Grounding("x", (10.0, 10.0, 100.0, 250.0))])
    assert img.size == (200, 300) and img.getpixel((100, 150)) == COLORS[0]


def test_the_prompt_is_qwens():
    assert grounding_prompt("the red car") == "Locate the red car, output its bbox coordinates using JSON format."
