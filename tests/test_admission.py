"""The scheduler's own admission of requests (a second check behind the front door) and the
private wire form's strict validation."""

from types import SimpleNamespace

import pytest

from sglang_lenvm.runtime.admission import admit
from sglang_lenvm.schema import PARAMS_KEY, LengthParams, RequestError


ABSENT = object()


class FakeReq:
    def __init__(self, raw=ABSENT, extra_key=None, max_new_tokens=100, min_new_tokens=0,
                 custom_logit_processor=None, rid="r1"):
        cp = {PARAMS_KEY: raw} if raw is not ABSENT else {}
        self.sampling_params = SimpleNamespace(custom_params=cp, max_new_tokens=max_new_tokens,
                                               min_new_tokens=min_new_tokens, beam_width=None)
        self.extra_key = extra_key
        self.custom_logit_processor = custom_logit_processor
        self.rid = rid
        self.aborted = None
        self.skip_radix_cache_insert = False

    def set_finish_with_abort(self, message, status_code=400, err_type="BadRequestError"):
        self.aborted = (message, int(status_code))


def run(**kw):
    req = FakeReq(**kw)
    admit(req, max_top_k=64, context_len=4096)
    return req


@pytest.mark.parametrize("raw,param", [
    ({"bogus": 1}, "custom_params.__lenvm.bogus"),
    ({"mode": "equal", "target": None}, "custom_params.__lenvm.mode"),
    ({"mode": "equal"}, "custom_params.__lenvm.mode"),
    ({"target": 5, "mode": "around"}, "custom_params.__lenvm.mode"),
    ({"target": 0, "mode": "equal"}, "custom_params.__lenvm.target"),
    ({"target": 10**9, "mode": "equal"}, "custom_params.__lenvm.target"),
    ({"target": 5.5, "mode": "equal"}, "custom_params.__lenvm.target"),
    ({"beta": float("nan")}, "custom_params.__lenvm.beta"),
    ({"beta": "x"}, "custom_params.__lenvm.beta"),
    ({"target": 5, "mode": "equal", "beta": 1.0}, "custom_params.__lenvm.beta"),
    ({"return_values": "yes"}, "custom_params.__lenvm.return_values"),
    ({"beta": 1.0, "top_k": 1000}, "custom_params.__lenvm.top_k"),
    ({"target": 5, "mode": "at_most", "budget": -1}, "custom_params.__lenvm.budget"),
    ("not a dict", "custom_params.__lenvm"),
])
def test_malformed_private_params_end_that_request_with_an_error(raw, param):
    with pytest.raises(RequestError) as e:
        LengthParams.from_wire(raw, max_top_k=64, context_len=4096)
    assert e.value.param == param
    req = run(raw=raw, extra_key="lenvm")
    assert req.aborted is not None and req.aborted[1] == 400
    assert req.lenvm_params is None and PARAMS_KEY not in req.sampling_params.custom_params
    assert req.skip_radix_cache_insert and req.extra_key == "user:lenvm"


def test_admission_applies_budgets_and_the_namespace():
    req = run(raw={"target": 8, "mode": "at_most"}, max_new_tokens=64, extra_key="tenant")
    assert req.aborted is None and req.sampling_params.max_new_tokens == 8
    assert req.extra_key == "lenvm|tenant" and req.lenvm_params.target == 8
    req = run(raw={"target": 30, "mode": "at_least", "budget_open": True}, max_new_tokens=16)
    assert req.sampling_params.max_new_tokens is None  # what the context leaves
    assert req.sampling_params.min_new_tokens == 29  # no stop token before the 30th
    req = run(raw={"target": 8, "mode": "equal", "budget": 10}, max_new_tokens=128)
    assert req.sampling_params.max_new_tokens == 10 and req.extra_key == "lenvm"
    req = run(raw={"target": 50, "mode": "equal"}, max_new_tokens=20)  # a limit below T
    assert req.aborted is not None and "max_new_tokens" in req.aborted[0]
    req = run(raw={"target": 5, "mode": "at_most"}, custom_logit_processor="x")
    assert req.aborted is not None and "custom_logit_processor" in req.aborted[0]


@pytest.mark.parametrize("raw", [
    {"target": 50, "mode": "equal"}, {"target": 8, "mode": "equal", "budget": 10},
    {"target": 30, "mode": "at_least", "budget_open": True}, {"target": 5, "mode": "at_most"},
])
def test_a_prefill_only_copy_stays_prefill_only(raw):
    """SGLang sends an n > 1 request's prompt first as a copy with max_new_tokens 0 (to cache
    it for the n samples): no budget turns it into a whole output, no limit check refuses it,
    and it enters the LenVM namespace, so the n samples share its LenVM KV."""
    req = run(raw=raw, max_new_tokens=0, extra_key="tenant")
    assert req.aborted is None and req.sampling_params.max_new_tokens == 0
    assert not req.sampling_params.min_new_tokens
    assert req.extra_key == "lenvm|tenant" and req.lenvm_params is not None


def test_inputs_the_lenvm_cannot_read_are_refused():
    for name in ("input_embeds", "mm_inputs"):
        req = FakeReq(raw={"target": 5, "mode": "at_most"})
        admit(req, max_top_k=64, context_len=4096,
              recv_req=SimpleNamespace(**{name: [[0.0]]}))
        assert req.aborted is not None and name in req.aborted[0]


def test_requests_without_the_lenvm_never_enter_its_namespace():
    req = run(extra_key="lenvm|x")
    assert req.lenvm_params is None and req.extra_key == "user:lenvm|x" and req.aborted is None
    req = run(extra_key="tenant")
    assert req.extra_key == "tenant"
    req = run(raw={"beta": 0.0}, extra_key="lenvm")  # valid, but uses nothing
    assert req.lenvm_params is None and req.extra_key == "user:lenvm"


def test_a_bug_in_admission_costs_one_request_a_500(monkeypatch):
    import sglang_lenvm.runtime.admission as adm

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(adm.LengthParams, "from_wire", boom)
    req = run(raw={"target": 5, "mode": "at_most"})
    assert req.aborted is not None and req.aborted[1] == 500 and "boom" in req.aborted[0]


def test_every_hook_target_resolves_in_the_pinned_sglang():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_lenvm.config import LenVMConfig
    from sglang_lenvm.runtime import hooks

    hooks.install(LenVMConfig(lenvm_path="/x"))
    HookRegistry.apply_hooks()
    assert hooks.missing_hooks() == []
    # a hook on a target that does not exist is reported by name
    bad = ("sglang.srt.managers.scheduler.Scheduler.no_such_method", lambda *a: None,
           HookType.AFTER)
    hooks._installed.append(bad)
    try:
        assert hooks.missing_hooks() == [bad[0]]
        with pytest.raises(RuntimeError, match="no_such_method"):
            hooks.verify_installed()
    finally:
        hooks._installed.remove(bad)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
wire = st.one_of(junk, st.fixed_dictionaries({}, optional={
    k: st.one_of(junk, st.integers(0, 20), st.sampled_from(["equal", "at_most", "at_least"]))
    for k in ("target", "mode", "beta", "return_values", "top_k", "greedy", "budget",
              "budget_open")}))


@settings(max_examples=300, deadline=None)
@given(raw=wire)
def test_admission_never_raises_on_any_private_form(raw):
    """Whatever reaches the scheduler: a parsed request, or that request refused with 400."""
    try:
        params = LengthParams.from_wire(raw, max_top_k=64, context_len=4096)
    except RequestError as e:
        assert e.param.startswith("custom_params.__lenvm")
        params = None
    req = FakeReq(raw=raw)
    admit(req, max_top_k=64, context_len=4096)
    if params is None:
        assert req.aborted is not None and req.aborted[1] == 400
    else:
        assert req.aborted is None or "max_new_tokens" in req.aborted[0]


def test_scoring_settings():
    """--lenvm-scoring: a name from SCORINGS; one-pass needs the checkpoint's candidate head;
    auto takes it when there is one."""
    from sglang_lenvm.config import LenVMConfig

    with pytest.raises(ValueError, match="--lenvm-scoring must be one of"):
        LenVMConfig(lenvm_path="/x", scoring="fast")
    with pytest.raises(ValueError, match="needs candidate_head.safetensors"):
        LenVMConfig(lenvm_path="/x", scoring="one-pass").resolved_scoring(False)
    assert LenVMConfig(lenvm_path="/x", scoring="one-pass").resolved_scoring(True) == "one-pass"
    assert LenVMConfig(lenvm_path="/x", scoring="auto").resolved_scoring(True) == "one-pass"
    assert LenVMConfig(lenvm_path="/x", scoring="auto").resolved_scoring(False) == "star"
    assert LenVMConfig(lenvm_path="/x").resolved_scoring(True) == "star"
    with pytest.raises(ValueError, match="trunk_layers"):
        LenVMConfig(lenvm_path="/x", trunk_layers=-1)
