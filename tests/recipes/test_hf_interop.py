"""The fused checkpoint's real client: HF transformers loads it and computes the
same logits as torchtune. Needs the ``hf`` extra (``pip install -e '.[hf]'``)."""

import pytest
import torch
from torchtune import training

from apex_tune import ApexSettings, apply_apex, unwrap_apex, set_selection
from apex_tune.dev.tiny import make_tiny_assets, tiny_llama3

from conftest import perturb_apex, random_selection

transformers = pytest.importorskip(
    "transformers", reason="HF transformers is not installed: pip install -e '.[hf]' (make test installs it)"
)


def _checkpointer(checkpoint_dir, output_dir):
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    return training.FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type="LLAMA3", output_dir=str(output_dir)
    )


def test_fused_checkpoint_loads_in_transformers(tmp_path):
    assets = tmp_path / "assets"
    make_tiny_assets(assets, num_train=20, num_val=5, seed=0)
    out = tmp_path / "out"
    checkpointer = _checkpointer(assets / "base", out)
    model = tiny_llama3()
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    # An APEX model with trained-looking operators and deltas, fused as the recipe saves it.
    settings = ApexSettings(ratio=0.25, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.6)
    apply_apex(model, settings)
    set_selection(model, random_selection(model, settings, seed=1))
    perturb_apex(model, seed=2)
    unwrap_apex(model)
    checkpointer.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0, intermediate_checkpoint=False)

    saved = out / "epoch_0"
    ours = tiny_llama3().eval()
    ours.load_state_dict(_checkpointer(saved, tmp_path / "unused").load_checkpoint()[training.MODEL_KEY])
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved, torch_dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        got = hf(tokens).logits
    # fp32: the two implementations order RoPE and attention sums differently; over
    # 2 layers of width 64 that is ~1e-6 of logits of size ~10 (eps 1.2e-7), so 1e-4
    # leaves a margin of ~100x and still catches any mis-mapped weight (errors ~1e-1).
    print(f"max |HF - torchtune| logits: {(got - expected).abs().max().item():.2e}")
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max() > 0.1
