"""The decoder-only presets against Hugging Face's own ``GPT2LMHeadModel`` and
``LlamaForCausalLM`` (built from tiny configs, no download): weights copied both ways give the
same logits on padded batches and the same generate() outputs, and an exported checkpoint loads
with plain transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tformer.cli import main
from tformer.convert import family, from_transformers, to_transformers
from tformer.hf import TformerConfig, TformerForCausalLM
from tformer.model import config_for
from tformer.tokenization import train_tokenizer

from .test_hf_causal import GENERATION_MODES

V = 60
TOLERANCE = 1e-5


def reference(name: str):
    """A randomly initialised tiny GPT-2 or Llama (GQA: 2 key/value heads for 4 query heads),
    float32, with its norms and biases randomised so that a mis-copied one cannot hide."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln" in n or "norm" in n:
                p.normal_(mean=1.0 if n.endswith("weight") else 0.0, std=0.2)
    return model.eval()


def padded_batch():
    """Rows left-padded, right-padded and full, with Hugging Face generate()'s positions
    (counting real tokens), which both models are given."""
    torch.manual_seed(1)
    ids = torch.randint(3, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids * mask, attention_mask=mask, position_ids=positions)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    batch = padded_batch()
    with torch.no_grad():
        diff = (a(**batch).logits - b(**batch).logits)[batch["attention_mask"].bool()]
    return diff.abs().max().item()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_weights_copied_both_ways_give_the_same_logits(name):
    ref = reference(name)
    ours = from_transformers(ref)
    assert isinstance(ours, TformerForCausalLM) and family(ours.config.transformer_config()) == name
    assert max_difference(ours, ref) < TOLERANCE
    back = to_transformers(ours)
    assert type(back) is type(ref)
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    # and from a model built here, of the preset, to the reference class
    torch.manual_seed(2)
    built = TformerForCausalLM(TformerConfig.from_transformer_config(
        config_for("tiny", V, name, dropout=0.0, max_positions=64))).eval()
    exported = to_transformers(built)
    assert max_difference(built, exported) < TOLERANCE
    if name == "llama":
        assert exported.config.num_key_value_heads == 2 < exported.config.num_attention_heads


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
def test_generate_equals_the_reference_under_left_padding(name, mode):
    ref = reference(name)
    ours = from_transformers(ref)
    torch.manual_seed(1)
    ids = torch.randint(3, V, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    options = dict(input_ids=ids * mask, attention_mask=mask, max_new_tokens=8,
                   min_new_tokens=8, pad_token_id=0, **GENERATION_MODES[mode])
    torch.manual_seed(3)
    expected = ref.generate(**options)
    torch.manual_seed(3)
    assert torch.equal(ours.generate(**options), expected)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_refusals_name_what_does_not_map(name):
    with pytest.raises(ValueError, match="neither to GPT-2 nor to Llama.*for gpt2: n_encoder_layers=2 "):
        family(config_for("tiny", V))
    ref = reference(name)
    if name == "gpt2":
        ref.config.scale_attn_by_inverse_layer_idx = True
        match = "scale_attn_by_inverse_layer_idx=True"
    else:
        ref.config.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
        match = "rope_type='linear'"
    with pytest.raises(ValueError, match=match):
        from_transformers(ref)


_PLAIN_TRANSFORMERS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
exported, checkpoint = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(exported).eval()
tokenizer = AutoTokenizer.from_pretrained(exported)
assert not any(name.startswith("tformer") for name in sys.modules), "tformer was imported"
ids = tokenizer("the cat sat", add_special_tokens=False, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
remote = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
print(json.dumps({"class": type(model).__name__, "ids": ids.tolist(), "logits": logits.tolist(),
                  "length": model.generation_config.max_new_tokens,
                  "remote": type(remote).__name__}))
"""


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exported_checkpoint_loads_with_plain_transformers(tmp_path, name, capsys):
    tokenizer = train_tokenizer(["the cat sat on the mat"] * 10, vocab_size=400, kind="bpe")
    torch.manual_seed(0)
    model = TformerForCausalLM(TformerConfig.from_transformer_config(
        config_for("tiny", len(tokenizer), name, dropout=0.0))).eval()
    checkpoint, exported = tmp_path / "checkpoint", tmp_path / "exported"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    assert main(["export", str(checkpoint), "--format", "transformers", "-o", str(exported)]) == 0
    assert "exported to" in capsys.readouterr().out
    assert json.loads((exported / "config.json").read_text())["model_type"] == name
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _PLAIN_TRANSFORMERS, str(exported),
                          str(checkpoint)], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["class"] == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[name]
    assert answer["length"] == 128  # the generation config keeps its length
    assert answer["remote"] == "TformerForCausalLM"  # the tformer checkpoint, through auto_map
    with torch.no_grad():
        ours = model(input_ids=torch.tensor(answer["ids"])).logits
    assert (ours - torch.tensor(answer["logits"])).abs().max() < TOLERANCE
