"""The client against the real server (`stylealign serve --model tiny`)."""

from __future__ import annotations

import hashlib
import io
import logging
import textwrap
import threading
from pathlib import Path

import grpc
import pytest
from PIL import Image

from stylealign_client import Client, Control, ControlNetInfo, ImageResult, Progress, Queued, RetryPolicy, Session, Started, StyleAlignError

from conftest import running_server


def test_list_models(client):
    models = client.list_models()
    assert "tiny" in models and models.names == ["tiny"]
    tiny = models["tiny"]
    assert (tiny.family, tiny.native_width, tiny.native_height, tiny.size_multiple, tiny.source) == ("SD1", 64, 64, 16, "<embedded>")
    assert (tiny.format, tiny.dtype, tiny.prediction_type, tiny.prediction_type_source, tiny.ema) == ("embedded", "fp32", "epsilon", "config", False)
    assert set(models.samplers) == {"ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"}
    assert (models.max_steps, models.max_prompts, models.default_steps) == (150, 8, 30)
    # The limits the memory budget allows (derived from this machine's memory).
    assert models.memory_budget_bytes > 0 and 0 < tiny.max_size <= models.max_size and 1 <= tiny.max_batch_rows <= 8
    with pytest.raises(KeyError, match="nope"):
        models["nope"]


def test_patch_model_node_and_official_options(client):
    default = client.patch_model("tiny")
    assert isinstance(default, Session) and default.model == "tiny" and default.session_id
    assert default.options == {"flavour": "node", "share_norm": "both", "share_attn": "q+k", "scale": 1.0}
    assert default.idle_ttl_seconds > 0 and default.expires_at > default.created_at

    s = client.patch_model("tiny", share_norm="group", share_attn="q+k+v", scale=0.5)
    assert s.options == {"flavour": "node", "share_norm": "group", "share_attn": "q+k+v", "scale": 0.5}
    assert s.switches["adain_v"] is True and s.switches["adain_site"] == "input"
    assert client.patch_model("tiny", share_norm="disabled", share_attn="disabled").options["share_attn"] == "disabled"

    official = client.patch_model("tiny", adain_values=True, shared_score_shift=0.5, full_attention_share=False)
    assert official.options["flavour"] == "official"
    assert official.options["adain_values"] is True and official.options["shared_score_shift"] == 0.5
    assert official.options["adain_queries"] is True  # unset: the official default
    assert official.switches["adain_site"] == "projected"
    assert client.get_session(official).options == official.options


def test_patch_model_window_and_levels(client):
    default = client.patch_model("tiny")
    assert default.window == (0.0, 1.0)
    assert list(default.levels) == ["down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2", "out"]
    assert default.levels["mid"] == {"enabled": True, "gain": 1.0, "share_group_norm": True, "share_attention": True}

    scoped = client.patch_model("tiny", window=(0.0, 0.5), levels={"up.1": {"enabled": False}, "down.0": {"gain": 0.5, "share_group_norm": False}})
    assert scoped.window == (0.0, 0.5)
    assert scoped.levels["up.1"] == {"enabled": False, "gain": 1.0, "share_group_norm": False, "share_attention": False}
    assert scoped.levels["down.0"] == {"enabled": True, "gain": 0.5, "share_group_norm": False, "share_attention": True}
    assert client.get_session(scoped).levels == scoped.levels

    prompts = ["a lighthouse, linocut print", "a fox, linocut print"]
    plain = [e for e in client.generate(default, prompts, seed=9, steps=3, width=32, height=32) if isinstance(e, ImageResult)]
    moved = [e for e in client.generate(scoped, prompts, seed=9, steps=3, width=32, height=32) if isinstance(e, ImageResult)]
    assert plain[1].image.tobytes() != moved[1].image.tobytes()
    assert moved[1].metadata["window"] == {"start": 0.0, "end": 0.5}
    assert moved[1].metadata["levels"] == [{"name": "up.1", "enabled": False}, {"name": "down.0", "gain": 0.5, "share_group_norm": False}]

    with pytest.raises(StyleAlignError) as e:
        client.patch_model("tiny", levels={"down.7": {"enabled": False}})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.fields == ["levels[0].name"]
    assert "down.0..down.2, mid, up.0..up.2, out" in str(e.value)
    with pytest.raises(StyleAlignError) as e:
        client.patch_model("tiny", window=(0.8, 0.2))
    assert e.value.fields == ["window.end"]
    with pytest.raises(ValueError, match="window: must be"):
        client.patch_model("tiny", window=0.5)
    with pytest.raises(ValueError, match=r"levels\[0\].enabled: must be True or False"):
        client.patch_model("tiny", levels={"mid": {"enabled": "no"}})
    with pytest.raises(ValueError, match=r"levels\[0\]: unknown option 'norm'"):
        client.patch_model("tiny", levels={"mid": {"norm": False}})


def test_patch_model_bad_options_are_python_errors(client):
    with pytest.raises(ValueError, match="share_norm: 'both!' is not one of 'both', 'group', 'layer', 'disabled'"):
        client.patch_model("tiny", share_norm="both!")
    with pytest.raises(ValueError, match="share_attn"):
        client.patch_model("tiny", share_attn="q")
    with pytest.raises(TypeError, match="unknown option adain_value .*advanced options: share_group_norm"):
        client.patch_model("tiny", adain_value=True)
    with pytest.raises(ValueError, match=r"advanced.adain_values: must be True or False"):
        client.patch_model("tiny", adain_values=1)
    with pytest.raises(ValueError, match=r"advanced.shared_score_scale: must be a number"):
        client.patch_model("tiny", shared_score_scale="1")
    with pytest.raises(ValueError, match="cannot be combined"):
        client.patch_model("tiny", share_norm="group", adain_values=True)


def test_generate_streams_events_then_images_with_metadata(client):
    session = client.patch_model("tiny", share_norm="group", scale=0.8)
    prompts = ["a lighthouse, linocut print", "a fox, linocut print", "a teapot, linocut print"]
    events = list(client.generate(session, prompts, seed=42, steps=3, guidance_scale=5.0, sampler="euler", negative_prompt="blurry"))

    kinds = [type(e).__name__ for e in events]
    first_started = kinds.index("Started")
    assert kinds[0] == "Queued" and set(kinds[:first_started]) == {"Queued"}, kinds
    assert kinds[first_started + 1 :] == ["Progress"] * 3 + ["ImageResult"] * 3, kinds
    assert isinstance(events[0], Queued) and events[0].queue_depth >= 1
    started = events[first_started]
    assert isinstance(started, Started) and started.batch_rows >= 3 and started.batch_sets >= 1 and started.queue_seconds >= 0
    assert [(p.step, p.total_steps) for p in events if isinstance(p, Progress)] == [(1, 3), (2, 3), (3, 3)]

    images = [e for e in events if isinstance(e, ImageResult)]
    assert [i.index for i in images] == [0, 1, 2]
    assert [i.is_reference for i in images] == [True, False, False]
    for img, prompt in zip(images, prompts):
        assert img.prompt == prompt and img.seed == 42 and (img.width, img.height) == (64, 64)
        assert img.png.startswith(b"\x89PNG\r\n\x1a\n")
        assert isinstance(img.image, Image.Image) and img.image.size == (64, 64) and img.image.mode == "RGB"
        # The PNG decodes to the same pixels when opened independently.
        assert Image.open(io.BytesIO(img.png)).tobytes() == img.image.tobytes()
        assert "parameters" in img.image.info and img.text["parameters"] == img.image.info["parameters"]
        meta = img.metadata
        assert meta is not None, img.text
        assert meta["prompt"] == prompt and meta["prompts"] == prompts and meta["index"] == img.index
        assert (meta["seed"], meta["steps"], meta["sampler"], meta["guidance_scale"]) == (42, 3, "euler", 5.0)
        assert (meta["width"], meta["height"], meta["model"], meta["negative_prompt"]) == (64, 64, "tiny", "blurry")
        assert meta["options"] == {"flavour": "node", "share_norm": "group", "share_attn": "q+k", "scale": 0.8}
    # Style-aligned images of different prompts differ.
    assert len({i.image.tobytes() for i in images}) == 3


def test_same_request_same_bytes_and_sizes(client, tmp_path):
    session = client.patch_model("tiny")
    a = client.generate_images(session, ["a red cube", "a blue ball"], seed=7, steps=2, width=32, height=48)
    b = client.generate_images(session.session_id, ["a red cube", "a blue ball"], seed=7, steps=2, width=32, height=48)
    assert [i.png for i in a] == [i.png for i in b]
    assert [i.image.size for i in a] == [(32, 48), (32, 48)]
    other_seed = client.generate_images(session, ["a red cube", "a blue ball"], seed=8, steps=2, width=32, height=48)
    assert other_seed[0].png != a[0].png
    a[1].save(tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == a[1].png


def test_count_priority_and_random_seed(client):
    session = client.patch_model("tiny")
    images = client.generate_images(session, "a cat", count=3, steps=1, priority="high", sampler="dpmpp_2m_karras")
    assert len(images) == 3 and {i.prompt for i in images} == {"a cat"}
    assert len({i.seed for i in images}) == 1  # one random seed for the set, reported with every image
    assert images[0].metadata["seed"] == images[0].seed and images[0].metadata["sampler"] == "dpmpp_2m_karras"


def test_reference_image_bytes_path_and_pil(client, tmp_path):
    session = client.patch_model("tiny")
    source = Image.new("RGB", (40, 40))
    source.putdata([(x * 6, y * 6, 128) for y in range(40) for x in range(40)])
    path = tmp_path / "ref.png"
    source.save(path)
    common = dict(seed=3, steps=2, reference_caption="a gradient", reference_offset=1, reference_guidance_scale=3.0)
    from_path = client.generate_images(session, ["a house", "a tree"], reference_image=path, **common)
    from_str = client.generate_images(session, ["a house", "a tree"], reference_image=str(path), **common)
    from_bytes = client.generate_images(session, ["a house", "a tree"], reference_image=path.read_bytes(), **common)
    assert [i.png for i in from_path] == [i.png for i in from_bytes] == [i.png for i in from_str]
    assert [i.is_reference for i in from_path] == [False, False]  # every prompt is a target
    ref = from_path[0].metadata["reference"]
    assert ref["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (ref["caption"], ref["offset"], ref["guidance_scale"]) == ("a gradient", 1, 3.0)

    from_pil = client.generate_images(session, ["a house", "a tree"], reference_image=source, **common)
    assert len(from_pil) == 2 and len(from_pil[0].metadata["reference"]["image_sha256"]) == 64

    with pytest.raises(ValueError, match="reference_image: cannot read"):
        client.generate(session, ["a house"], reference_image=tmp_path / "missing.png", reference_caption="x")
    with pytest.raises(ValueError, match="reference_image: expected bytes, a path or a PIL.Image"):
        client.generate(session, ["a house"], reference_image=42, reference_caption="x")
    with pytest.raises(StyleAlignError) as e:
        list(client.generate(session, ["a house"], reference_image=b"not an image", reference_caption="x", steps=2))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.fields == ["reference_image"]


def _gradient(size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 6, y * 6, 128) for y in range(size) for x in range(size)])
    return image


def _pixels(images: list[ImageResult]) -> list[bytes]:
    return [i.image.tobytes() for i in images]


def test_list_models_shows_the_embedded_controlnet(client):
    models = client.list_models()
    assert models.controlnet_names == ["tiny-controlnet"]
    info = models.controlnet("tiny-controlnet")
    assert isinstance(info, ControlNetInfo)
    assert (info.name, info.family, info.source, info.models) == ("tiny-controlnet", "SD1", "<embedded>", ["tiny"])
    assert len(info.hash) == 10 and int(info.hash, 16) >= 0
    with pytest.raises(KeyError, match="canny.*served: tiny-controlnet"):
        models.controlnet("canny")


def test_img2img_target_changes_only_its_image(client, tmp_path):
    session = client.patch_model("tiny")
    prompts = ["a lighthouse, linocut print", "a fox, linocut print", "a boat, linocut print"]
    common = dict(seed=11, steps=4, width=32, height=32)
    plain = client.generate_images(session, prompts, **common)
    init = _gradient()
    path = tmp_path / "init.png"
    init.save(path)

    moved = client.generate_images(session, prompts, init_images={2: path}, strength=0.5, **common)
    pixels = _pixels(moved)
    assert pixels[0] == _pixels(plain)[0] and pixels[1] == _pixels(plain)[1]  # the reference and the other target
    assert pixels[2] != _pixels(plain)[2]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for image in moved:
        assert image.metadata["init_images"] == [{"index": 2, "image_sha256": sha, "strength": 0.5}]
    assert "Denoising strength: 0.5" in moved[2].infotext and f"Init image sha256: {sha}" in moved[2].infotext
    assert "Denoising strength" not in moved[1].infotext and "Denoising strength" not in moved[0].infotext

    # The same request as a list of tuples, with bytes, a str path, or the strength per image.
    assert _pixels(client.generate_images(session, prompts, init_images=[(2, path.read_bytes())], strength=0.5, **common)) == pixels
    assert _pixels(client.generate_images(session, prompts, init_images=[(2, str(path), 0.5)], **common)) == pixels
    assert _pixels(client.generate_images(session, prompts, init_images={2: (path, 0.5)}, strength=0.9, **common)) == pixels
    # A PIL image; a stronger strength changes the image further from the init; unset: the server's 0.8.
    pil = client.generate_images(session, prompts, init_images={2: init}, **common)
    assert pil[2].metadata["init_images"][0]["strength"] == 0.8 and "Denoising strength: 0.8" in pil[2].infotext
    assert _pixels(pil)[:2] == _pixels(plain)[:2]
    assert pil[2].image.tobytes() not in (pixels[2], _pixels(plain)[2])

    # With a reference image, targets count from 0.
    with_ref = client.generate_images(
        session, ["a fox", "a boat"], reference_image=path, reference_caption="a gradient", init_images={0: init}, strength=0.75, seed=11, steps=4, width=32, height=32
    )
    assert with_ref[0].metadata["init_images"][0]["index"] == 0 and "Denoising strength: 0.75" in with_ref[0].infotext


def test_control_changes_the_targets_not_the_reference(client, tmp_path):
    session = client.patch_model("tiny")
    prompts = ["a lighthouse, linocut print", "a fox, linocut print", "a boat, linocut print"]
    common = dict(seed=5, steps=4, width=32, height=32)
    plain = client.generate_images(session, prompts, **common)
    control_image = _gradient()
    path = tmp_path / "edges.png"
    control_image.save(path)

    controlled = client.generate_images(session, prompts, controls=[Control("tiny-controlnet", path, conditioning_scale=0.8, end=0.75)], **common)
    pixels = _pixels(controlled)
    assert pixels[0] == _pixels(plain)[0]  # the reference gets no control
    assert pixels[1] != _pixels(plain)[1] and pixels[2] != _pixels(plain)[2]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    hash10 = client.list_models().controlnet("tiny-controlnet").hash
    for image in controlled:
        (recorded,) = image.metadata["controls"]
        assert recorded["model"] == "tiny-controlnet" and recorded["model_sha256"].startswith(hash10)
        assert (recorded["images_sha256"], recorded["conditioning_scale"], recorded["start"], recorded["end"]) == ([sha], 0.8, 0.0, 0.75)
    line = f'ControlNet 0: "model: tiny-controlnet [{hash10}], scale: 0.8, window: 0.0-0.75"'
    assert line in controlled[1].infotext and line in controlled[2].infotext
    assert "ControlNet" not in controlled[0].infotext

    # A dict and a one-element list give the same images; bytes and PIL images are accepted.
    as_dict = client.generate_images(session, prompts, controls=[{"model": "tiny-controlnet", "images": [path.read_bytes()], "conditioning_scale": 0.8, "end": 0.75}], **common)
    assert _pixels(as_dict) == pixels
    # One image per target, and two ControlNets summed.
    per_target = client.generate_images(session, prompts, controls=[Control("tiny-controlnet", [control_image, control_image.rotate(90)])], **common)
    assert len(per_target[1].metadata["controls"][0]["images_sha256"]) == 2
    assert _pixels(per_target)[0] == _pixels(plain)[0]
    two = client.generate_images(session, prompts, controls=[Control("tiny-controlnet", path), Control("tiny-controlnet", path, conditioning_scale=0.5)], **common)
    assert [c["conditioning_scale"] for c in two[1].metadata["controls"]] == [1.0, 0.5]
    assert 'ControlNet 1: "model: tiny-controlnet' in two[2].infotext and _pixels(two)[0] == _pixels(plain)[0]

    # With img2img on the same target.
    both = client.generate_images(session, prompts, init_images={1: control_image}, strength=0.5, controls=[Control("tiny-controlnet", path)], **common)
    assert _pixels(both)[0] == _pixels(plain)[0] and "Denoising strength: 0.5" in both[1].infotext and "ControlNet 0" in both[1].infotext


@pytest.mark.parametrize(
    "kwargs, field, says",
    [
        (dict(init_images={1: _gradient()}, strength=1.5), "init_images[0].strength", "1.5"),
        (dict(init_images=[(1, _gradient(), 0.5), (1, _gradient())]), "init_images[1].index", ""),
        (dict(init_images={0: _gradient()}), "init_images[0].index", ""),  # the reference
        (dict(init_images={1: b"not an image"}), "init_images[0].image", ""),
        (dict(controls=[{"model": "no-such-controlnet", "images": [_gradient()]}]), "controls[0].model", "tiny-controlnet"),
        (dict(controls=[Control("tiny-controlnet", [_gradient()] * 3)]), "controls[0].images", ""),
        (dict(controls=[Control("tiny-controlnet", _gradient(), conditioning_scale=11.0)]), "controls[0].conditioning_scale", ""),
        (dict(controls=[Control("tiny-controlnet", _gradient(), start=0.8, end=0.2)]), "controls[0].end", ""),
    ],
)
def test_bad_init_images_and_controls_are_invalid_argument_naming_the_field(client, kwargs, field, says):
    session = client.patch_model("tiny")
    with pytest.raises(StyleAlignError) as e:
        list(client.generate(session, ["a lighthouse", "a fox"], steps=2, width=32, height=32, **kwargs))
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [field] and f"`{field}`" in str(err), str(err)
    assert says in str(err) and err.attempts == 1


def test_bad_init_images_and_controls_are_python_errors(client, tmp_path):
    session = client.patch_model("tiny")
    image = _gradient()
    cases = [
        (dict(init_images=image), "init_images: expected a dict"),
        (dict(init_images=[(1,)]), r"init_images\[0\]: expected \(index, image\)"),
        (dict(init_images={-1: image}), r"init_images\[0\].index: must be an integer"),
        (dict(init_images=[(1, image), (2, 42)]), r"init_images\[1\].image: expected bytes, a path or a PIL.Image, got int"),
        (dict(init_images={1: tmp_path / "missing.png"}), r"init_images\[0\].image: cannot read"),
        (dict(init_images={1: image}, strength="0.5"), "strength: must be a number"),
        (dict(init_images=[(1, image, "high")]), r"init_images\[0\].strength: must be a number"),
        (dict(strength=0.5), "strength: only with init_images"),
        (dict(controls=Control("tiny-controlnet", image)), "controls: expected a list"),
        (dict(controls=["tiny-controlnet"]), r"controls\[0\]: expected a Control or a dict, got str"),
        (dict(controls=[{"model": "tiny-controlnet", "image": image}]), r"controls\[0\]: unknown key image \(known: model, images, conditioning_scale, start, end\)"),
        (dict(controls=[{"model": "tiny-controlnet"}]), r"controls\[0\]: needs 'model' and 'images'"),
        (dict(controls=[Control(None, image)]), r"controls\[0\].model: must be a string"),
        (dict(controls=[Control("tiny-controlnet", 42)]), r"controls\[0\].images: expected an image"),
        (dict(controls=[Control("tiny-controlnet", [image, 42])]), r"controls\[0\].images\[1\]: expected bytes, a path or a PIL.Image"),
        (dict(controls=[Control("tiny-controlnet", image, end="1")]), r"controls\[0\].end: must be a number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            client.generate(session, ["a lighthouse", "a fox"], **kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=1000), "steps"),
        (dict(width=33), "width"),
        (dict(height=4096), "height"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(prompts=[]), "prompts"),
        (dict(prompts=["a"] * 9), "prompts"),
        (dict(reference_image=Image.new("RGB", (16, 16))), "reference_caption"),
        (dict(size_conditioning={"original_width": 128, "crop_top": 8}), "size_conditioning"),  # tiny is SD1
        (dict(count=2), "count"),  # count needs exactly one prompt
    ],
)
def test_bad_generate_values_are_invalid_argument_naming_the_field(client, kwargs, field):
    session = client.patch_model("tiny")
    prompts = kwargs.pop("prompts", ["a cat", "a dog"])
    with pytest.raises(StyleAlignError) as e:
        list(client.generate(session, prompts, **kwargs))
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, str(err)
    assert err.fields == [field] and f"`{field}`" in str(err) and str(err).startswith("INVALID_ARGUMENT: ")
    assert err.attempts == 1  # not retried


def test_every_invalid_field_and_the_reason_read_well(client):
    session = client.patch_model("tiny")
    with pytest.raises(StyleAlignError) as e:
        list(client.generate(session, ["a cat"], width=33, steps=1000, guidance_scale=-1.0))
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_FIELD"
    assert sorted(err.fields) == ["guidance_scale", "steps", "width"]
    text = str(err)
    for line in ["  field `width`: 33 is not a multiple of 16", "  field `steps`: 1000 exceeds the limit", "  reason INVALID_FIELD (domain stylealign.v1): fields=3"]:
        assert line in text, text
    assert err.retry_delay is None and err.attempts == 1


def test_over_the_memory_budget_is_not_retried():
    with running_server("--memory-budget", "1MiB") as addr, Client(addr, client_id="budget-test") as client:
        client.wait_ready(timeout=120)
        session = client.patch_model("tiny")
        with pytest.raises(StyleAlignError) as e:
            list(client.generate(session, ["a cat", "a dog"], width=64, height=64, steps=1))
        err = e.value
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "OVER_MEMORY_BUDGET", str(err)
        assert err.retry_delay == 60 and err.attempts == 1  # RetryInfo, but the reason says a retry cannot help
        meta = err.error_info.metadata
        assert int(meta["estimate_bytes"]) > int(meta["limit_bytes"]) and meta["budget_bytes"] == str(1 << 20)
        assert "retry after 60s" in str(err) and "reason OVER_MEMORY_BUDGET (domain stylealign.v1): budget_bytes=1048576" in str(err)
        models = client.list_models()
        assert models.memory_budget_bytes == 1 << 20
        assert models["tiny"].max_size < models.max_size and models["tiny"].max_batch_rows < 2


def test_bad_patch_values_and_unknown_session(client):
    with pytest.raises(StyleAlignError) as e:
        client.patch_model("no-such-model")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.fields == ["model"] and "no-such-model" in str(e.value)
    with pytest.raises(StyleAlignError) as e:
        client.patch_model("tiny", scale=1.5)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.fields == ["scale"]
    with pytest.raises(StyleAlignError) as e:
        list(client.generate("sa1.not-a-session", ["a cat"]))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(StyleAlignError) as e:
        client.get_session("unknown")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and str(e.value).startswith("NOT_FOUND: ")


def test_bad_generate_arguments_are_python_errors(client):
    session = client.patch_model("tiny")
    cases = [
        (dict(sampler="dpm++"), "sampler: 'dpm\\+\\+' is not one of 'ddim', 'euler'"),
        (dict(priority="urgent"), "priority"),
        (dict(steps=-1), r"steps: must be an integer in \[0, 4294967295\]"),
        (dict(steps=2.5), "steps"),
        (dict(seed=1 << 64), "seed"),
        (dict(guidance_scale="7"), "guidance_scale: must be a number"),
        (dict(size_conditioning={"crop": 1}), "size_conditioning: unknown key crop"),
        (dict(timeout=0), "timeout"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            client.generate(session, ["a cat"], **kwargs)
    with pytest.raises(ValueError, match=r"prompts\[1\]: must be a string"):
        client.generate(session, ["a cat", 3])
    with pytest.raises(ValueError, match="session: expected a Session or a session id"):
        client.generate(None, ["a cat"])


def test_release_then_get_session_is_not_found(client):
    session = client.patch_model("tiny")
    assert client.get_session(session).session_id == session.session_id
    client.release_session(session)
    with pytest.raises(StyleAlignError) as e:
        client.get_session(session)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(StyleAlignError) as e:
        list(client.generate(session, ["a cat"], steps=1))
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_sessions_belong_to_their_client_id(server):
    with Client(server, client_id="owner-1") as owner, Client(server, client_id="owner-2") as other:
        session = owner.patch_model("tiny")
        with pytest.raises(StyleAlignError) as e:
            other.get_session(session)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert owner.get_session(session).session_id == session.session_id


def test_closing_the_stream_early_cancels_it(client):
    session = client.patch_model("tiny")
    stream = client.generate(session, ["a cat", "a dog"], steps=40, seed=1)
    for event in stream:
        if isinstance(event, Progress):
            break
    stream.close()
    # The client and the session still work.
    assert len(client.generate_images(session, ["a cat"], steps=1, seed=1)) == 1


def test_auth_with_token(auth_server):
    with Client(auth_server, token="alice-secret-token") as alice:
        assert "tiny" in alice.list_models()
        session = alice.patch_model("tiny")
        images = alice.generate_images(session, ["a cat", "a dog"], steps=1, seed=5)
        assert len(images) == 2 and images[1].metadata["seed"] == 5
        with Client(auth_server, token="bob-secret-token") as bob:
            with pytest.raises(StyleAlignError) as e:
                bob.get_session(session)
            assert e.value.code == grpc.StatusCode.NOT_FOUND
        # x-client-id does not override the token's identity.
        with Client(auth_server, token="alice-secret-token", client_id="bob") as alice_too:
            assert alice_too.get_session(session).session_id == session.session_id
    for kwargs in (dict(), dict(client_id="alice"), dict(token="wrong-token")):
        with Client(auth_server, **kwargs) as anonymous:
            with pytest.raises(StyleAlignError) as e:
                anonymous.list_models()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, kwargs
            assert e.value.attempts == 1


def test_client_arguments_are_checked():
    with pytest.raises(ValueError, match="target"):
        Client("")
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=-1)
    with pytest.raises(ValueError, match="token"):
        Client("127.0.0.1:1", token=" ")
    with pytest.raises(ValueError, match="root_certificates: cannot read"):
        Client("127.0.0.1:1", root_certificates="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="max_attempts"):
        Client("127.0.0.1:1", max_attempts=0)


def test_readme_example_works_as_written(server, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("## Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) == 5, example
    monkeypatch.chdir(tmp_path)
    exec(compile(example.replace("127.0.0.1:50051", server), "README.md", "exec"), {})
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["image_0.png", "image_1.png"]
    with Image.open(tmp_path / "image_1.png") as image:
        assert image.size == (64, 64) and "parameters" in image.info


def test_readme_img2img_and_controlnet_example_works_as_written(server, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "controls=" in b.split("```", 1)[0]]
    monkeypatch.chdir(tmp_path)
    for name, angle in (("fox_sketch.png", 0), ("fox_edges.png", 90), ("boat_edges.png", 180)):
        _gradient().rotate(angle).save(name)
    exec(compile(example.replace("127.0.0.1:50051", server), "README.md", "exec"), {})
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("image_"))
    assert saved == ["image_0.png", "image_1.png", "image_2.png"]
    infotexts = {}
    for name in saved:
        with Image.open(tmp_path / name) as image:
            infotexts[name] = image.info["parameters"]
    assert "Denoising strength: 0.6" in infotexts["image_1.png"] and "Denoising strength" not in infotexts["image_2.png"]
    assert all('ControlNet 0: "model: tiny-controlnet' in infotexts[n] for n in ("image_1.png", "image_2.png"))
    assert "ControlNet" not in infotexts["image_0.png"]


def test_repository_readme_shows_the_same_example():
    # The repository's README repeats the example (indented in a list): it must stay the tested one.
    package_readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = package_readme.split("## Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    repo_readme = (Path(__file__).resolve().parents[3] / "README.md")
    if not repo_readme.exists():
        pytest.skip("run from an installed copy outside the repository")
    blocks = [b.split("```", 1)[0] for b in repo_readme.read_text().split("```python\n")[1:]]
    dedented = [textwrap.dedent(b) for b in blocks]
    assert example in dedented, "README.md's Python example differs from clients/python/README.md's"


def test_generate_retries_a_full_admission_queue(caplog):
    # One worker, no batching, a queue of one: while A runs and B waits, C is RESOURCE_EXHAUSTED.
    with running_server("--max-queue", "1", "--no-batching") as addr, Client(addr, client_id="queue-test") as client:
        client.wait_ready(timeout=120)
        session = client.patch_model("tiny")
        long_run = client.generate(session, ["a long one", "another"], steps=30, seed=1)
        for event in long_run:  # A: until it runs
            if isinstance(event, Started):
                break
        waiting = client.generate(session, ["b"], steps=1, seed=2)
        assert isinstance(next(waiting), Queued)  # B: in the queue
        with pytest.raises(StyleAlignError) as e:
            with Client(addr, client_id="queue-test", max_attempts=1) as impatient:
                list(impatient.generate(session, ["c"], steps=1, seed=3))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in e.value.message and e.value.attempts == 1

        # With retries, C gets in once A and B are done.
        patient = Client(addr, client_id="queue-test", retry=RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=0.3))
        done = threading.Event()

        def drain():
            list(long_run)
            list(waiting)
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        with caplog.at_level(logging.INFO, logger="stylealign_client"):
            images = patient.generate_images(session, ["c"], steps=1, seed=3)
        patient.close()
        assert len(images) == 1 and images[0].prompt == "c"
        retries = [r.getMessage() for r in caplog.records if r.name == "stylealign_client"]
        assert retries and all(m.startswith("Generate: RESOURCE_EXHAUSTED: admission queue full") for m in retries), retries
        assert done.wait(60)
