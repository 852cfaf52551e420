"""LoRAs from the client: `list_loras()`, `patch_model(loras=...)` against a server started with
`--lora-dir` holding the repository's LoRA of the embedded model (tests/fixtures/loras) and a file
that is not a LoRA."""

from __future__ import annotations

import shutil

import grpc
import pytest

from stylealign_client import Client, StyleAlignError

from conftest import REPO_ROOT, running_server

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "loras" / "tiny-ink.safetensors"


@pytest.fixture(scope="module")
def lora_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    shutil.copy(FIXTURE, folder / "ink.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with running_server("--lora-dir", str(folder)) as addr:
        with Client(addr) as c:
            c.wait_ready(timeout=120)
            yield c


def _pixels(images) -> list[bytes]:
    return [im.image.tobytes() for im in images]


def test_list_loras_shows_the_folder(lora_client):
    loras = lora_client.list_loras()
    assert sorted(loras.names) == ["broken", "ink"] and "ink" in loras
    ink = loras["ink"]
    assert (ink.family, ink.format, ink.rank, ink.models) == ("SD1", "kohya", 1, ["tiny"]) and ink.layers > 10
    assert len(ink.hash) == 10 and ink.size_bytes > 0 and ink.memory_bytes > 0 and ink.problems == []
    assert loras["broken"].models == [] and loras["broken"].problems
    assert loras.cache_budget_bytes > 0
    with pytest.raises(KeyError, match="nope.*served: "):
        loras["nope"]


def test_a_sessions_loras_change_its_images(lora_client):
    common = dict(steps=3, width=32, height=32, seed=7)
    prompts = ["a lighthouse", "a fox"]
    plain = lora_client.generate_images(lora_client.patch_model("tiny"), prompts, **common)
    session = lora_client.patch_model("tiny", loras={"ink": 0.9})
    assert session.loras == {"ink": pytest.approx(0.9)}
    assert lora_client.get_session(session).loras == session.loras
    inked = lora_client.generate_images(session, prompts, **common)
    negative = lora_client.generate_images(lora_client.patch_model("tiny", loras=[("ink", -0.9)]), prompts, **common)
    assert _pixels(inked) != _pixels(plain) and _pixels(negative) != _pixels(inked)
    # Same session options, same images.
    again = lora_client.generate_images(lora_client.patch_model("tiny", loras=["ink"]), prompts, **common)
    once_more = lora_client.generate_images(lora_client.patch_model("tiny", loras={"ink": 1.0}), prompts, **common)
    assert _pixels(again) == _pixels(once_more)


@pytest.mark.parametrize(
    "loras, field",
    [
        ({"nope": 1.0}, "loras[0].name"),
        ({"broken": 1.0}, "loras[0].name"),
        ([("ink", 1.0), ("ink", 0.5)], "loras[1].name"),
        ({"ink": 50.0}, "loras[0].weight"),
    ],
)
def test_bad_loras_are_invalid_argument_naming_the_field(lora_client, loras, field):
    with pytest.raises(StyleAlignError) as e:
        lora_client.patch_model("tiny", loras=loras)
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [field] and f"`{field}`" in str(err), str(err)


def test_bad_loras_are_python_errors(lora_client):
    with pytest.raises(ValueError, match="loras: expected a mapping"):
        lora_client.patch_model("tiny", loras="ink")
    with pytest.raises(ValueError, match=r"loras\[0\]: expected a name or a \(name, weight\) pair"):
        lora_client.patch_model("tiny", loras=[42])
    with pytest.raises(ValueError, match=r"loras\[0\].weight: must be a number"):
        lora_client.patch_model("tiny", loras=[("ink", "heavy")])
