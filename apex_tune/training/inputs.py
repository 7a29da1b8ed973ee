"""Checks of untrusted input files, run before training: one clear line per problem.

Data files, checkpoints and resume states come from elsewhere (shared storage,
downloads, other users' runs); configs are trusted (their ``_component_`` paths
are imported, as in torchtune). Every check here reads without executing
anything: safetensors headers are parsed as JSON by hand, data files as UTF-8
text and JSON. Each raises :class:`InputError` naming the file (and row or
tensor) and what to do about it.
"""

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

# safetensors dtype names a model weight may have (what torch reads back as floating point)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# the largest safetensors header the reference implementation accepts (100 MB)
MAX_HEADER_BYTES = 100_000_000


class InputError(ValueError):
    """An input file that cannot be used as it is; the message names it and the fix."""


def safetensors_header(path: Path) -> Dict[str, Dict[str, Any]]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets),
    checked against the file's size, so that an empty, truncated or foreign file is
    refused here rather than half-way through loading."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes): it was not written completely; copy it again")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path} is truncated ({size} bytes, less than a safetensors header); copy it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise InputError(
                f"{path} is not a safetensors file or is truncated (its header claims {header_len} bytes, "
                f"the file has {size}); copy it again or point at the right file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a table")
    except ValueError as e:
        raise InputError(f"{path} is not a safetensors file (unreadable header: {e}); point at the right file") from e
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: tensor {name} has a malformed header entry; re-export the file") from e
        if stop < start:
            raise InputError(f"{path}: tensor {name} has a malformed header entry; re-export the file")
        entry.update(shape=shape, dtype=dtype)
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise InputError(
            f"{path} is truncated: its tensors need {8 + header_len + end} bytes, the file has {size}; copy it again"
        )
    return header


def check_weight_files(paths: Iterable[Path]) -> Dict[str, Dict[str, Any]]:
    """Every safetensors file of a checkpoint: whole, and every tensor floating point.
    Returns the combined tensor table (HF names)."""
    table: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        if Path(path).suffix != ".safetensors":
            continue  # torchtune reads .bin/.pt with weights_only=True
        for name, entry in safetensors_header(path).items():
            if entry["dtype"] not in FLOAT_DTYPES:
                raise InputError(
                    f"{path}: tensor {name} has dtype {entry['dtype']}; model weights are floating point "
                    f"({', '.join(FLOAT_DTYPES[:4])}): re-export the checkpoint or point at the right files"
                )
            table[name] = {**entry, "file": str(path)}
    return table


def check_finite(state_dict: Dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or infinite values in a loaded base model, naming the tensor."""
    for name, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            kind = "NaN" if torch.isnan(value).any() else "infinite"
            raise InputError(
                f"{where}: tensor {name} has {kind} values: the checkpoint is corrupt; "
                "re-download or re-export it"
            )


# config.json field -> what the weights say (HF layout of Llama / Qwen2 / Mistral checkpoints)
def _dims_from_weights(table: Dict[str, Dict[str, Any]]) -> Dict[str, int]:
    dims = {}
    embed = table.get("model.embed_tokens.weight")
    if embed and len(embed["shape"]) == 2:
        dims["vocab_size"], dims["hidden_size"] = embed["shape"]
    layers = {int(k.split(".")[2]) for k in table if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if layers:
        dims["num_hidden_layers"] = max(layers) + 1
    gate = table.get("model.layers.0.mlp.gate_proj.weight")
    if gate and len(gate["shape"]) == 2:
        dims["intermediate_size"] = gate["shape"][0]
    return dims


def check_hf_config(path: Path, table: Dict[str, Dict[str, Any]], model_dims: Dict[str, int]) -> None:
    """``config.json`` next to HF weights must describe them and the model: torchtune's
    HF checkpointer re-orders q/k rows by its head counts, so a wrong one loads silently
    scrambled weights."""
    try:
        hf_config = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(hf_config, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path} is not a valid config.json ({e}); use the model's own config.json") from e
    for field, value in _dims_from_weights(table).items():
        if field in hf_config and hf_config[field] != value:
            raise InputError(
                f"{path} says {field}={hf_config[field]!r}, the weights have {value}: this config.json "
                "does not belong to these weights; use the model's own config.json"
            )
    for field, value in model_dims.items():
        if field in hf_config and hf_config[field] != value:
            raise InputError(
                f"{path} says {field}={hf_config[field]!r}, the model config builds {value}: fix the "
                "model section or use the model's own config.json"
            )


# ------------------------------------------------------------------- data
def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} line {number} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
            "binary data or another encoding; convert it to UTF-8 (e.g. iconv -t utf-8) or remove that line"
        ) from e


def _check_row(path: Path, number: int, row: Any, columns: Dict[str, str]) -> None:
    if not isinstance(row, dict):
        raise InputError(f"{path} line {number} is a JSON {type(row).__name__}, not an object with columns; fix that row")
    for column, kind in columns.items():
        if column not in row:
            raise InputError(
                f"{path} line {number} lacks column {column!r} (it has {sorted(row)[:6]}): add it, "
                "or map your column names with dataset.column_map"
            )
        value = row[column]
        if kind == "text" and not isinstance(value, str):
            raise InputError(
                f"{path} line {number}: column {column!r} is a JSON {type(value).__name__}, not a string; "
                "fix that row (quote the value)"
            )
        if kind == "messages" and not (
            isinstance(value, list)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                    for m in value)
        ):
            raise InputError(
                f"{path} line {number}: column {column!r} is not a list of {{role, content}} messages "
                "with string values; fix that row"
            )


def dataset_columns(node: Dict[str, Any]) -> Dict[str, str]:
    """The columns a torchtune dataset builder reads, and what each must hold."""
    component = str(node.get("_component_", ""))
    column_map = dict(node.get("column_map") or {})
    if component.endswith("instruct_dataset"):
        return {column_map.get("input", "input"): "text", column_map.get("output", "output"): "text"}
    if component.endswith("text_completion_dataset"):
        return {node.get("column", "text"): "text"}
    if component.endswith("chat_dataset"):
        return {node.get("conversation_column", "messages"): "messages"}
    return {}  # another builder: its columns are its own business; the file is still checked


def check_data_file(path: Path, source: str, columns: Dict[str, str]) -> None:
    """A local data file: UTF-8 text; for ``source: json`` every row an object with
    the columns the builder reads, as strings. Reads line by line (big corpora)."""
    path = Path(path)
    json_rows = source == "json" or path.suffix in (".json", ".jsonl")
    if not json_rows and source != "text" and path.suffix != ".txt":
        return  # csv, parquet, ...: read by their own parsers
    with open(path, "rb") as f:
        if json_rows and path.suffix == ".json":
            text = _decode(path, 1, f.read())
            try:
                data = json.loads(text)
            except ValueError:
                data = None  # JSON lines in a .json file, as HF datasets also accepts
            if isinstance(data, list):
                for i, row in enumerate(data):
                    _check_row(path, i + 1, row, columns)
                return
            f.seek(0)
        for number, raw in enumerate(f, start=1):
            line = _decode(path, number, raw)
            if "\x00" in line:
                raise InputError(f"{path} line {number} contains NUL bytes: binary data, not text; point at a text file")
            if not json_rows or not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(
                    f"{path} line {number} is not valid JSON ({e}); fix or remove that line"
                ) from e
            _check_row(path, number, row, columns)


def tokenizer_error(path: Optional[str], error: Exception) -> InputError:
    """The one-line error for a tokenizer that failed to load from ``path``."""
    detail = " ".join(str(error).split())[:200]
    if path is None or not Path(path).exists():
        return InputError(f"tokenizer.path={path} does not exist; point it at the model's tokenizer file")
    return InputError(
        f"tokenizer.path: {path} is not a tokenizer file this tokenizer can read ({type(error).__name__}: "
        f"{detail}); point tokenizer.path at the model's own tokenizer (e.g. tokenizer.model)"
    )


def model_dims(model: torch.nn.Module) -> Dict[str, int]:
    """The config.json fields a torchtune decoder (built on the meta device) fixes."""
    dims: Dict[str, int] = {}
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) == 0:
        return dims
    dims["num_hidden_layers"] = len(layers)
    attn = getattr(layers[0], "attn", None)
    if attn is not None:
        dims["num_attention_heads"] = attn.num_heads
        dims["num_key_value_heads"] = attn.num_kv_heads
        dims["hidden_size"] = attn.embed_dim
    embeddings = getattr(model, "tok_embeddings", None)
    if embeddings is not None:
        dims["vocab_size"] = embeddings.num_embeddings
    return dims

