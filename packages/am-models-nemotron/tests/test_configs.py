"""Configs as users of the reference write them: dense checkpoints and plain config objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _nemotron_helpers import cpu_backend, randomize_hf, rel_err, tiny_config
from transformers import NemotronHConfig
from transformers import NemotronHForCausalLM as HFNemotronH

from am_models_nemotron import NemotronHForCausalLM, NemotronV3Model

TOL = 1e-4
DENSE = ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp"]
EXPERT_FIELDS = (
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "moe_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "moe_latent_size",
    "norm_topk_prob",
    "n_shared_experts",
    "moe_shared_expert_overlap",
    "output_router_logits",
)


def _plain_fields(config: NemotronHConfig, drop=()) -> dict:
    """What a user would write by hand: the config's own fields, the block list, no extras."""
    fields = {k: v for k, v in config.to_dict().items() if k not in drop}
    for internal in ("architectures", "transformers_version", "model_type", "layer_types"):
        fields.pop(internal, None)
    return fields


class PlainConfig:
    """A plain class carrying attributes, as a reference user may write."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _ids(seed=1, batch=2, seq=13):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense_saved(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize_hf(HFNemotronH(tiny_config(DENSE))).eval()
    path = tmp_path_factory.mktemp("dense")
    hf.save_pretrained(path)
    return hf, path


def test_dense_checkpoint_matches_transformers_logits_loss_and_gradients(dense_saved):
    hf, path = dense_saved
    ours = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())
    assert ours.model.moe_config is None
    assert ours.state_dict_adapter.num_experts == 0
    ids = _ids()
    labels = ids.clone()
    labels[1, :4] = -100
    ref, out = hf(ids, labels=labels), ours(ids, labels=labels)
    assert rel_err(out.logits, ref.logits) <= TOL
    assert torch.allclose(out.loss, ref.loss, rtol=TOL, atol=0)
    ref.loss.backward()
    out.loss.backward()
    mapped = ours.state_dict_adapter.from_hf({n: p.grad for n, p in hf.named_parameters()})
    params = dict(ours.named_parameters())
    assert set(mapped) == set(params)
    for name, param in params.items():
        assert rel_err(param.grad, mapped[name]) <= TOL, name


@pytest.mark.parametrize("kind", ["namespace", "plain_class"])
def test_dense_plain_config_without_any_expert_field(dense_saved, kind):
    hf, path = dense_saved
    fields = _plain_fields(hf.config, drop=EXPERT_FIELDS)
    assert not any(hasattr(SimpleNamespace(**fields), f) for f in EXPERT_FIELDS)
    config = SimpleNamespace(**fields) if kind == "namespace" else PlainConfig(**fields)
    ours = NemotronHForCausalLM(config, backend=cpu_backend())  # raised AttributeError before
    assert ours.model.moe_config is None
    reference = NemotronHForCausalLM.from_pretrained(path, backend=cpu_backend())
    ours.load_state_dict(reference.state_dict())
    ids = _ids(seed=2)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= TOL
    base = NemotronV3Model(SimpleNamespace(**fields), cpu_backend())
    assert base.moe_config is None


def test_dense_model_rejects_moe_overrides_it_cannot_use():
    with pytest.raises(ValueError, match=r"moe_overrides \['route_scale'\].*no moe blocks"):
        NemotronHForCausalLM(tiny_config(DENSE), cpu_backend(), moe_overrides={"route_scale": 2.0})


def test_moe_heads_of_mtp_get_a_moe_config_on_a_dense_decoder():
    cfg = tiny_config(DENSE, num_nextn_predict_layers=1, mtp_layers_block_type=["moe"])
    m = NemotronHForCausalLM(cfg, backend=cpu_backend())
    assert m.model.moe_config is not None and m.mtp.layers["0"].block_type == "moe"


def test_missing_attributes_are_listed_in_one_error():
    fields = _plain_fields(tiny_config(), drop=("n_routed_experts", "mamba_num_heads"))
    with pytest.raises(AttributeError, match=r"\['mamba_num_heads', 'n_routed_experts'\]"):
        NemotronHForCausalLM(SimpleNamespace(**fields), backend=cpu_backend())


@pytest.fixture(scope="module")
def namespace_pair():
    """A model built from a SimpleNamespace and one from the equal NemotronHConfig."""
    torch.manual_seed(0)
    hf_config = tiny_config(["linear_attention", "moe", "full_attention", "mlp"])
    fields = _plain_fields(hf_config, drop=("head_dim", "bos_token_id", "eos_token_id"))
    fields["pad_token_id"] = None
    ns = SimpleNamespace(**fields)
    ours = NemotronHForCausalLM(ns, backend=cpu_backend())
    ours.initialize_weights(dtype=torch.float32)
    reference = NemotronHForCausalLM(hf_config, backend=cpu_backend())
    reference.load_state_dict(ours.state_dict())
    return ns, ours.eval(), reference.eval()


def test_namespace_config_forward_and_loss_equal_a_transformers_config(namespace_pair):
    ns, ours, reference = namespace_pair
    assert ours.config.head_dim == ns.hidden_size // ns.num_attention_heads  # not HF's 128
    ids = _ids(seed=3)
    a, b = ours(ids, labels=ids), reference(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_namespace_config_generates_with_default_generation_config(namespace_pair):
    ns, ours, reference = namespace_pair
    # The namespace carries no bos/eos: transformers' defaults, not NemotronHConfig's ids.
    assert ours.generation_config.eos_token_id is None
    assert ours.generation_config.bos_token_id is None
    prompt = _ids(seed=4, seq=5)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    got = ours.generate(prompt, **kwargs)
    assert got.shape == (2, 11)
    assert torch.equal(got, reference.generate(prompt, eos_token_id=None, **kwargs))


def test_namespace_config_saves_and_loads_back(namespace_pair, tmp_path):
    ns, ours, _ = namespace_pair
    ours.save_pretrained(tmp_path)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path, backend=cpu_backend())
    assert loaded.config.head_dim == ns.hidden_size // ns.num_attention_heads
    ids = _ids(seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)
    hf = HFNemotronH.from_pretrained(tmp_path).eval()  # and it is a transformers checkpoint
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ours(ids).logits) <= TOL
