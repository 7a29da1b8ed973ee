"""Untrusted files (data, checkpoints, resume state): refused in one line naming the
file and the fix, before training, and a resume state never executes code."""

import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from apex_tune.training.checkpointing import (
    LEGACY_STATE_FILE,
    RECIPE_STATE_DIR,
    STATE_MANIFEST,
    CheckpointError,
    load_local_model_state,
    load_rank_state,
    read_state_manifest,
    write_recipe_state,
)
from apex_tune.training.inputs import (
    InputError,
    check_data_file,
    check_finite,
    check_hf_config,
    check_weight_files,
    dataset_columns,
    safetensors_header,
    tokenizer_error,
)
from recipe_runs import tune_run


class _CreatesFile:
    """A pickle payload: unpickling it creates ``path`` (what an attacker's code would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(target, marker):
    target.write_bytes(pickle.dumps({"format": 2, "payload": _CreatesFile(marker)}))


def weights(path, **override):
    tensors = {
        "model.embed_tokens.weight": torch.randn(32, 8),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(16, 8),
        "model.layers.1.mlp.gate_proj.weight": torch.randn(16, 8),
        **override,
    }
    save_file(tensors, str(path))
    return path


INSTRUCT = {"_component_": "torchtune.datasets.instruct_dataset", "column_map": {"input": "question", "output": "answer"}}
TEXT = {"_component_": "torchtune.datasets.text_completion_dataset", "column": "text"}
GOOD_ROW = json.dumps({"question": "2 + 2?", "answer": "4"}) + "\n"


def _data_case(tmp_path, name, content, source, node):
    path = tmp_path / name
    path.write_bytes(content)
    check_data_file(path, source, dataset_columns(node))


# (case, how to make it and run the check, the words the message must contain)
CATALOGUE = [
    ("zero-byte safetensors", lambda d: safetensors_header((d / "w.safetensors").open("wb").close() or d / "w.safetensors"),
     ["w.safetensors is empty (0 bytes)", "copy it again"]),
    ("truncated safetensors", lambda d: safetensors_header(_truncate(weights(d / "w.safetensors"))),
     ["w.safetensors is truncated", "copy it again"]),
    ("foreign file as safetensors", lambda d: safetensors_header(_write(d / "w.safetensors", b"PK\x03\x04" * 64)),
     ["w.safetensors is not a safetensors file", "point at the right file"]),
    ("wrong dtype", lambda d: check_weight_files([weights(d / "w.safetensors", **{
        "model.layers.0.mlp.gate_proj.weight": torch.zeros(16, 8, dtype=torch.int64)})]),
     ["tensor model.layers.0.mlp.gate_proj.weight has dtype I64", "re-export the checkpoint"]),
    ("NaN in the base", lambda d: check_finite({"layers.0.mlp.w1.weight": torch.tensor([1.0, float("nan")])}, "ckpt"),
     ["tensor layers.0.mlp.w1.weight has NaN values", "re-download"]),
    ("config.json vs weights", lambda d: check_hf_config(
        _write(d / "config.json", json.dumps({"num_hidden_layers": 3, "hidden_size": 8}).encode()),
        check_weight_files([weights(d / "w.safetensors")]), {}),
     ["config.json says num_hidden_layers=3, the weights have 2", "use the model's own config.json"]),
    ("config.json vs model heads", lambda d: check_hf_config(
        _write(d / "config.json", json.dumps({"num_attention_heads": 4}).encode()), {}, {"num_attention_heads": 8}),
     ["config.json says num_attention_heads=4, the model config builds 8"]),
    ("config.json not JSON", lambda d: check_hf_config(_write(d / "config.json", b"\x80\x04garbage"), {}, {}),
     ["config.json is not a valid config.json"]),
    ("binary garbage dataset", lambda d: _data_case(d, "train.jsonl", b"\x1f\x8b\x08\x00" + bytes(range(128, 256)) * 8, "json", INSTRUCT),
     ["train.jsonl line 1 is not UTF-8 text", "convert it to UTF-8"]),
    ("invalid JSON line", lambda d: _data_case(d, "train.jsonl", (GOOD_ROW * 2 + "{question: 1,\n").encode(), "json", INSTRUCT),
     ["train.jsonl line 3 is not valid JSON", "fix or remove that line"]),
    ("non-string field", lambda d: _data_case(
        d, "train.jsonl", (GOOD_ROW + json.dumps({"question": "2 + 3?", "answer": 5}) + "\n").encode(), "json", INSTRUCT),
     ["train.jsonl line 2: column 'answer' is a JSON int, not a string"]),
    ("missing column", lambda d: _data_case(d, "train.jsonl", (GOOD_ROW + '{"question": "x"}\n').encode(), "json", INSTRUCT),
     ["train.jsonl line 2 lacks column 'answer'", "dataset.column_map"]),
    ("row not an object", lambda d: _data_case(d, "train.jsonl", (GOOD_ROW + "[1, 2]\n").encode(), "json", INSTRUCT),
     ["train.jsonl line 2 is a JSON list, not an object"]),
    ("non-UTF-8 text for CPT", lambda d: _data_case(
        d, "corpus.txt", "first line\nLa cité\n".encode("latin-1"), "text", TEXT),
     ["corpus.txt line 2 is not UTF-8 text (byte 0xe9", "iconv"]),
    ("NUL bytes in text", lambda d: _data_case(d, "corpus.txt", b"text\x00\x00\x00\n", "text", TEXT),
     ["corpus.txt line 1 contains NUL bytes"]),
    ("tokenizer file that is not one", lambda d: _load_tokenizer(_write(d / "tokenizer.model", os.urandom(300))),
     ["tokenizer.path:", "tokenizer.model is not a tokenizer file", "model's own tokenizer"]),
]


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


def _load_tokenizer(path):
    from torchtune.models.llama2 import llama2_tokenizer

    try:
        llama2_tokenizer(str(path))
    except Exception as e:  # what the recipe turns into its one line
        raise tokenizer_error(str(path), e) from e


@pytest.mark.parametrize("case,make,words", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_malformed_input_is_one_line_naming_file_and_fix(tmp_path, case, make, words):
    with pytest.raises(InputError) as caught:
        make(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_well_formed_inputs_pass(tmp_path):
    path = weights(tmp_path / "w.safetensors")
    table = check_weight_files([path])
    assert table["model.embed_tokens.weight"]["shape"] == [32, 8]
    check_hf_config(_write(tmp_path / "config.json", json.dumps({"num_hidden_layers": 2, "vocab_size": 32}).encode()),
                    table, {"num_hidden_layers": 2})
    check_finite(load_file(str(path)), "ckpt")
    _data_case(tmp_path, "train.jsonl", (GOOD_ROW * 3 + "\n").encode(), "json", INSTRUCT)
    _data_case(tmp_path, "rows.json", json.dumps([{"question": "a", "answer": "b"}]).encode(), "json", INSTRUCT)
    _data_case(tmp_path, "corpus.txt", "La cité\n".encode(), "text", TEXT)


# ------------------------------------------------------------ resume state
def _save_state(output_dir, label, tensors, step=3, defer_commit=False):
    meta = {"progress": {"global_step": step}, "selection": [], "optimizer": {}, "dataloader": None,
            "ranker": None, "data_counts": {}}
    return write_recipe_state(output_dir, label, 0, {**tensors, "rng": torch.get_rng_state()}, meta,
                              world_size=1, global_step=step, barrier=lambda: None, defer_commit=defer_commit)


def test_resume_state_layout_and_round_trip(tmp_path):
    _save_state(tmp_path, "step_3", {"model.w": torch.ones(2, 3)})
    _save_state(tmp_path, "step_6", {"model.w": torch.full((2, 3), 2.0)}, step=6)
    root = tmp_path / RECIPE_STATE_DIR
    assert sorted(p.name for p in root.iterdir()) == [STATE_MANIFEST, "step_6"]  # the older one removed
    assert sorted(p.name for p in (root / "step_6").iterdir()) == ["rank_0.json", "rank_0.safetensors"]
    manifest = read_state_manifest(tmp_path)
    assert manifest == {"format": 2, "state": "step_6", "world_size": 1, "global_step": 6}
    state = load_rank_state(tmp_path, manifest, 0)
    assert torch.equal(state["tensors"]["model.w"], torch.full((2, 3), 2.0))

    model = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(CheckpointError, match=r"tensor model.weight is missing"):
        load_local_model_state(model, state["tensors"], "rank_0.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor model.weight is torch.float32 \(3, 2\), this rank's shard"):
        load_local_model_state(model, {"model.weight": torch.zeros(3, 2)}, "rank_0.safetensors")
    load_local_model_state(model, {"model.weight": torch.full((2, 3), 5.0)}, "rank_0.safetensors")
    assert torch.equal(model.weight, torch.full((2, 3), 5.0))


def test_deferred_commit_keeps_the_previous_state_current_until_it_runs(tmp_path):
    """A stage boundary's state becomes current only once its effective ranks are recorded:
    until the returned commit runs, a resume finds the previous state, whole."""
    assert _save_state(tmp_path, "step_3", {"model.w": torch.ones(2, 3)}) is None
    commit = _save_state(tmp_path, "stage_1", {"model.w": torch.full((2, 3), 2.0)}, step=6, defer_commit=True)
    root = tmp_path / RECIPE_STATE_DIR
    assert read_state_manifest(tmp_path)["state"] == "step_3"
    assert torch.equal(load_rank_state(tmp_path, read_state_manifest(tmp_path), 0)["tensors"]["model.w"],
                       torch.ones(2, 3))
    commit()
    assert read_state_manifest(tmp_path) == {"format": 2, "state": "stage_1", "world_size": 1, "global_step": 6}
    assert sorted(p.name for p in root.iterdir()) == [STATE_MANIFEST, "stage_1"]


@pytest.mark.parametrize("planted", ["manifest", "shard", "meta", "legacy"])
def test_foreign_pickle_as_resume_state_never_runs(tmp_path, planted):
    out = tmp_path / "run"
    _save_state(out, "step_3", {"model.w": torch.ones(2)})
    marker = tmp_path / "pwned"
    root = out / RECIPE_STATE_DIR
    target = {
        "manifest": root / STATE_MANIFEST,
        "shard": root / "step_3" / "rank_0.safetensors",
        "meta": root / "step_3" / "rank_0.json",
        "legacy": out / LEGACY_STATE_FILE,
    }[planted]
    if planted == "legacy":  # an older apex_tune's state file alone
        shutil.rmtree(root)
    plant_pickle(target, marker)
    with pytest.raises(CheckpointError) as caught:
        load_rank_state(out, read_state_manifest(out), 0)
    message = str(caught.value)
    assert str(target) in message and "away to start over" in message and "\n" not in message
    assert not marker.exists(), "loading the resume state executed code"


def test_manifest_cannot_point_outside_the_state_folder(tmp_path):
    _save_state(tmp_path, "step_3", {"model.w": torch.ones(2)})
    path = tmp_path / RECIPE_STATE_DIR / STATE_MANIFEST
    path.write_text(json.dumps({"format": 2, "state": "../../etc", "world_size": 1, "global_step": 3}))
    with pytest.raises(CheckpointError, match="incomplete or of another version"):
        read_state_manifest(tmp_path)


def test_truncated_shard_is_refused(tmp_path):
    _save_state(tmp_path, "step_3", {"model.w": torch.ones(1000)})
    _truncate(tmp_path / RECIPE_STATE_DIR / "step_3" / "rank_0.safetensors")
    with pytest.raises(CheckpointError, match="rank_0.safetensors is unreadable: .* is truncated"):
        load_rank_state(tmp_path, read_state_manifest(tmp_path), 0)


def test_safetensors_header_length_is_bounded(tmp_path):
    path = _write(tmp_path / "w.safetensors", struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(InputError, match="header claims"):
        safetensors_header(path)


# ------------------------------------------------- the recipe, end to end
def _copy_base(assets, tmp_path, edit):
    base = tmp_path / "base"
    shutil.copytree(assets / "base", base)
    edit(base)
    return [f"checkpointer.checkpoint_dir={base}"]


def _edit_weights(base, key_part, change):
    path = base / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if key_part in k)
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path))


def _edit_config(base, **fields):
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **fields}))


def _file(tmp_path, name, data):
    return _write(tmp_path / name, data)


CPT = ["dataset._component_=torchtune.datasets.text_completion_dataset", "dataset.source=text",
       "dataset.column=text", "~dataset.column_map", "~dataset.train_on_input"]
# (case, overrides made in tmp_path, what stderr's one line must say)
RECIPE_CASES = [
    ("NaN in the base", lambda a, t: _copy_base(a, t, lambda b: _edit_weights(
        b, "layers.1.mlp.down_proj", lambda v: v.index_fill(0, torch.tensor([3]), float("nan")))),
     "config error: checkpointer: the checkpoint in"),
    ("wrong dtype in the base", lambda a, t: _copy_base(a, t, lambda b: _edit_weights(
        b, "layers.0.self_attn.q_proj", lambda v: v.to(torch.int32))),
     "config error: checkpointer:"),
    ("config.json heads", lambda a, t: _copy_base(a, t, lambda b: _edit_config(b, num_attention_heads=4)),
     "config error: checkpointer:"),
    ("invalid JSON line", lambda a, t: [f"dataset.data_files={_file(t, 'train.jsonl', (GOOD_ROW * 40 + '{oops').encode())}"],
     "config error: dataset.data_files:"),
    ("non-UTF-8 CPT text", lambda a, t: [*CPT, f"dataset.data_files={_file(t, 'corpus.txt', 'caf'.encode() + bytes([0xe9]) + b' au lait' * 999)}"],
     "config error: dataset.data_files:"),
    ("tokenizer", lambda a, t: [f"tokenizer.path={_file(t, 'tokenizer.model', b'not a sentencepiece model' * 20)}"],
     "config error: tokenizer.path:"),
]
RECIPE_WORDS = {
    "NaN in the base": "tensor layers.1.mlp.w2.weight has NaN values",
    "wrong dtype in the base": "model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has dtype I32",
    "config.json heads": "config.json says num_attention_heads=4, the model config builds 8",
    "invalid JSON line": "train.jsonl line 41 is not valid JSON",
    "non-UTF-8 CPT text": "corpus.txt line 1 is not UTF-8 text (byte 0xe9 at column 4)",
    "tokenizer": "tokenizer.model is not a tokenizer file",
}


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_line_refusal(proc, out, before, expected):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("apex_finetune: ")]
    for words in expected:
        assert words in line, line
    assert _snapshot(out) == before, "something was written into the existing output_dir"


@pytest.mark.slow
@pytest.mark.parametrize("case,make,kind", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_refuses_malformed_input_before_training(assets, tmp_path, case, make, kind):  # noqa: F811
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    before = _snapshot(out)
    proc = tune_run(assets, out, *make(assets, tmp_path), check=False)
    _assert_one_line_refusal(proc, out, before, [kind, RECIPE_WORDS[case]])


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["shard", "legacy"])
def test_recipe_refuses_foreign_pickle_resume_state(assets, tmp_path, planted):  # noqa: F811
    out = tmp_path / "existing_output"
    marker = tmp_path / "pwned"
    if planted == "shard":
        _save_state(out, "step_3", {"model.w": torch.ones(2)})
        target = out / RECIPE_STATE_DIR / "step_3" / "rank_0.safetensors"
    else:
        out.mkdir()
        target = out / LEGACY_STATE_FILE
    plant_pickle(target, marker)
    before = _snapshot(out)
    proc = tune_run(assets, out, "resume_from_checkpoint=True", check=False)
    _assert_one_line_refusal(proc, out, before, ["apex_finetune: stopped: ", str(target), "away to start over"])
    assert not marker.exists(), "the resume state executed code"


def test_optimizer_state_round_trip_is_exact_and_saving_changes_nothing():
    """The optimizer's own state dict through safetensors + JSON: saving an empty state
    leaves it empty (no hidden step), and a restored AdamW continues bit for bit."""
    from safetensors.torch import load, save

    from apex_tune.training.checkpointing import load_local_optimizer_state, local_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    before = [p.detach().clone() for p in model.parameters()]
    local_optimizer_state(optimizer, {})
    assert not optimizer.state and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    optimizer.step()
    tensors = {}
    meta = json.loads(json.dumps(local_optimizer_state(optimizer, tensors)))
    copy = torch.nn.Linear(4, 3)
    copy.load_state_dict(model.state_dict())
    restored = torch.optim.AdamW(copy.parameters(), lr=0.5)
    load_local_optimizer_state(restored, meta, load(save(tensors)), "test")
    assert restored.param_groups[0]["betas"] == (0.9, 0.95) and restored.param_groups[0]["lr"] == 1e-2
    for m, opt in ((model, optimizer), (copy, restored)):
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))


def test_state_json_cannot_name_a_class_to_import():
    """Only torchao's low-bit state classes are ever rebuilt from a state file's JSON."""
    from apex_tune.training.checkpointing import decode

    planted = {"__subclass__": "os.system", "parts": {}, "ctx": ["touch pwned"], "dtensor": False}
    with pytest.raises(CheckpointError, match="missing or malformed"):
        decode({"exp_avg": planted}, {}, "rank_0.json")
