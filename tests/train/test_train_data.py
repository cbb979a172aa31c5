"""Training data conversion: P2R-10k-format rows -> OpenRLHF prompt datasets, bad rows reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import p2r10k
import pytest
from PIL import Image

from p2r_recipe import prompts
from p2r_recipe.train import data, prepare, schema
from p2r_recipe.train.schema import TrainSample
from p2r_recipe.train.services import DEFAULT_PORTS, ServiceConfig


def _bad_parquet_rows() -> list[dict]:
    rows = p2r10k.embedded_rows(6)
    rows.append(p2r10k.row(100, "mca", {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "x.png"}))
    rows.append(p2r10k.row(101, "yes_or_no", {"bytes": p2r10k.png(p2r10k.picture(1)), "path": None}))
    bad_choice = p2r10k.row(102, "mca", {"bytes": p2r10k.png(p2r10k.picture(2)), "path": None})
    bad_choice["reward_model"]["ground_truth"] = "the red one"
    rows.append(bad_choice)
    two = p2r10k.row(103, "na", {"bytes": p2r10k.png(p2r10k.picture(3)), "path": None})
    two["images"] = two["images"] * 2
    rows.append(two)
    return rows


def test_parquet_with_embedded_images(tmp_path):
    source = p2r10k.write_parquet(tmp_path / "train.parquet", _bad_parquet_rows())
    out = tmp_path / "out"
    assert prepare.main(["--role", "perceiver", "--source", str(source), "--out", str(out)]) == 0

    summary = json.loads((out / "summary_perceiver.json").read_text())["conversion"]
    # The release keeps an mca row whose truth is no letter (it just never scores); so do we.
    assert summary["rows"] == 10 and summary["samples"] == 7 and summary["rejected"] == 3
    assert summary["rejected_by_reason"] == {"corrupt_image": 1, "unknown_answer_form": 1, "image_count": 1}
    assert {r["id"] for r in summary["rejected_rows"]} == {"100", "101", "103"}
    assert summary["answer_forms"] == {"mca": 3, "na": 2, "free_form": 2}

    lines = [json.loads(line) for line in (out / "perceiver.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and not (out / "perceiver_val.jsonl").read_text()  # 7 rows: nothing held out
    for i, line in enumerate(lines[:6]):
        sample = TrainSample.from_label(line["label"])
        form = p2r10k.forms(6)[i]
        assert (sample.id, sample.question, sample.answer_form) == (str(i), p2r10k.question(i, form), form)
        assert sample.answer == p2r10k.answer(i, form) and sample.datasource == "synthetic"
        assert line["images"] == [sample.fitted_image] and os.path.isabs(sample.image)
        assert Path(sample.image).read_bytes() == p2r10k.png(p2r10k.picture(i))  # stored as is, by content hash
        text = prompts.perceive_text(sample.question, training=True)
        # The release's rollout prompt "<image>\n" + text, cut at the tag as verl cuts it.
        assert line["prompt"][1]["content"] == [{"type": "image"}, {"type": "text", "text": "\n" + text}]


def test_jsonl_paths_stay_inside_the_image_root(tmp_path):
    root = tmp_path / "root"
    rows = p2r10k.path_rows(3, root)
    p2r10k.picture(9).save(tmp_path / "outside.png")
    (root / "imgs" / "link.png").symlink_to(tmp_path / "outside.png")
    rows += [
        p2r10k.row(10, "na", "../outside.png"),
        p2r10k.row(11, "na", str(tmp_path / "outside.png")),
        p2r10k.row(12, "na", "imgs/link.png"),
        p2r10k.row(13, "na", "imgs/missing.png"),
    ]
    (root / "imgs" / "empty.png").write_bytes(b"")
    rows.append(p2r10k.row(14, "na", "imgs/empty.png"))
    source = p2r10k.write_jsonl(tmp_path / "train.jsonl", rows)
    with source.open("a") as f:
        f.write("{not json\n")

    conversion = data.convert(str(source), tmp_path / "out", image_root=root)
    assert [s.id for s in conversion.samples] == ["0", "1", "2"]
    assert all(s.image.startswith(str(root.resolve())) for s in conversion.samples)
    reasons = {r["id"]: r["reason"] for r in conversion.rejected}
    assert reasons == {
        "10": "image_outside_root", "11": "image_outside_root", "12": "image_outside_root",
        "13": "missing_image", "14": "corrupt_image", None: "bad_json",
    }  # fmt: skip
    assert conversion.rejected[-1]["detail"].startswith("line 9")


def test_policy_sees_an_upright_copy_within_the_training_budget(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    p2r10k.picture(0, (2400, 1800)).save(root / "big.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    p2r10k.picture(1, (320, 240)).save(root / "turned.jpg", exif=exif)
    source = p2r10k.write_jsonl(tmp_path / "t.jsonl", [p2r10k.row(0, "na", "big.png"), p2r10k.row(1, "na", "turned.jpg")])
    big, turned = data.convert(str(source), tmp_path / "out", image_root=root).samples
    assert big.image == str(root / "big.png")
    with Image.open(big.fitted_image) as image:
        assert image.format == "JPEG" and image.size == (1664, 1248)  # smart_resize to <= 2,097,152 pixels
    with Image.open(turned.fitted_image) as image:
        assert image.size == (320, 256)  # as stored: the release applies no EXIF rotation; sides rounded to 32
    again = data.convert(str(source), tmp_path / "out", image_root=root).samples
    assert again[0].fitted_image == big.fitted_image


def test_paths_without_image_root_are_rejected(tmp_path):
    source = p2r10k.write_jsonl(tmp_path / "t.jsonl", p2r10k.path_rows(2, tmp_path / "root"))
    conversion = data.convert(str(source), tmp_path / "out")
    assert not conversion.samples and {r["reason"] for r in conversion.rejected} == {"missing_image"}


def test_question_is_the_prompt_text_over_extra_info():
    row = p2r10k.row(0, "mca", "x.png")
    row["extra_info"]["question"] = "What colour is square 0?"  # the options are only in the prompt
    row["prompt"] = [
        {"role": "system", "content": "sys <image>"},
        {"role": "user", "content": "<image>\n <image>\t" + p2r10k.question(0, "mca") + "  \n"},
        {"role": "user", "content": "a later turn"},
    ]
    assert data._question(row) == p2r10k.question(0, "mca")  # every tag and the whitespace after it removed
    row["prompt"][1]["content"] = [{"type": "image"}, {"type": "text", "text": "<image> Q1?"}, {"type": "text", "text": "Q2"}]
    assert data._question(row) == "Q1?"  # the first text part
    row["prompt"] = [{"role": "user", "content": "<image>"}]
    assert data._question(row) == "What colour is square 0?"  # no prompt text: extra_info.question
    row["extra_info"]["question"] = ""
    with pytest.raises(data.RowError, match="missing_question"):
        data._question(row)


def test_rows_without_answer_form_are_free_form(tmp_path):
    row = p2r10k.row(0, "na", {"bytes": p2r10k.png(p2r10k.picture(0)), "path": None})
    del row["extra_info"]["answer_form"]
    [sample] = data.convert(str(p2r10k.write_parquet(tmp_path / "t.parquet", [row])), tmp_path / "out").samples
    assert sample.answer_form == "free_form"


def test_policy_prompt_writes_image_then_newline_per_image():
    assert schema.policy_messages("Q", 3)[1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"}, {"type": "text", "text": "\n"},
        {"type": "image"}, {"type": "text", "text": "\nQ"},
    ]  # fmt: skip


def test_validation_slice_is_seeded_and_held_out(tmp_path):
    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(30))

    def split(out: str, seed: int) -> tuple[list[str], list[str], dict]:
        assert prepare.main(["--role", "perceiver", "--source", str(source), "--out", str(tmp_path / out),
                          "--val-size", "3", "--val-seed", str(seed)]) == 0  # fmt: skip
        ids = [
            [TrainSample.from_label(json.loads(line)["label"]).id for line in (tmp_path / out / name).read_text().splitlines()]
            for name in ("perceiver.jsonl", "perceiver_val.jsonl")
        ]
        return *ids, json.loads((tmp_path / out / "summary_perceiver.json").read_text())["validation"]

    train, val, summary = split("a", 0)
    assert len(val) == 3 and len(train) == 27 and not set(train) & set(val)
    assert summary == {"size": 3, "seed": 0, "ids": val}
    assert split("b", 0)[:2] == (train, val)  # the same seed holds out the same rows
    assert split("c", 1)[1] != val
    assert data.hold_out(list(range(1000)), 64, 0)[1] == data.hold_out(list(range(1000)), 64, 0)[1]
    assert len(data.hold_out(list(range(100)), 64, 0)[1]) == 10  # at most a tenth


def test_label_round_trip_and_bad_labels():
    sample = TrainSample("7", "Q?", "A", "mca", "/x.png", has_evidence=True, box_count=2)
    assert TrainSample.from_label(sample.to_label()) == sample
    with pytest.raises(ValueError, match="not a P2R training label"):
        TrainSample.from_label('{"id": "1"}')


def test_rows_load_through_openrlhf_and_the_chat_template(tmp_path, tiny_model_dir):
    """The written JSONL as OpenRLHF reads it: `datasets` json loader, its preprocess_data, the VLM chat template."""
    from datasets import load_dataset
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from openrlhf.utils.vlm_utils import load_images
    from transformers import AutoProcessor

    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(3))
    prepare.main(["--role", "perceiver", "--source", str(source), "--out", str(tmp_path / "out")])
    dataset = load_dataset("json", data_files=str(tmp_path / "out" / "perceiver.jsonl"), split="train")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    for item in dataset:
        prompt, label = preprocess_data(item, None, "prompt", "label", processor.apply_chat_template)
        sample = TrainSample.from_label(label)
        text = prompts.perceive_text(sample.question, training=True)
        assert prompt == (
            f"<|im_start|>system\n{prompts.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>\n{text}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert [im.size for im in load_images(item["images"])] == [(320, 256)]  # the fitted copy


def test_service_config_from_env():
    assert [ServiceConfig.from_env(n, {}).port for n in ("reasoner", "perceiver", "verifier")] == [18901, 18902, 18903]
    assert len(set(DEFAULT_PORTS.values())) == 3
    env = {
        "VERIFIER_HOST": "::1",
        "VERIFIER_PORT": "9000",
        "VERIFIER_MODEL": "judge",
        "VERIFIER_API_KEY": "k",
        "P2R_RETRIES": "2",
    }
    config = ServiceConfig.from_env("verifier", env)
    assert (config.base_url, config.model, config.api_key, config.retries) == ("http://[::1]:9000/v1", "judge", "k", 2)
    assert ServiceConfig.from_env("reasoner", {}).model == "reasoner"
    with pytest.raises(ValueError, match="PERCEIVER_PORT"):
        ServiceConfig.from_env("perceiver", {"PERCEIVER_PORT": "eighty"})
