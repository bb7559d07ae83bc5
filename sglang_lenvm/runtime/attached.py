"""Every attribute this package attaches to SGLang objects, in one place.

Req (one request, scheduler process)
  lenvm_params   schema.LengthParams | None: set at admission (admission.py); None: not a LenVM
                 request (or refused)
  lenvm_fault    str | None: why LenVM guidance stopped for this request (faults.quarantine);
                 such a request samples unguided from then on and is never cached
SamplingBatchInfo
  lenvm_state    length_state.LengthState | None: the batch's per-request length state
ForwardBatch (one step)
  lenvm_last_z   tensor [bs]: raw LenVM value at each prefill row's last prompt token
  lenvm_last_h   tensor [bs, H]: the LenVM's hidden state there (one-pass scoring only)
  lenvm_trunk    tensor [tokens, H]: the base model's residual stream entering layer `trunk`
                 (shared trunk only; hooks._capture_trunk); captured on the forward's
                 SamplingBatchInfo (as `lenvm_trunk` too), moved here after the forward
  lenvm_output   outputs.LenVMDeviceOutput: values to report for this step
ModelRunner (the base model's)
  _lenvm_forward_batch  the ForwardBatch being sampled (set around ModelRunner.sample)

Reads go through the helpers below, which give the default for objects SGLang created
without passing our hooks.
"""

from __future__ import annotations

from typing import Optional


def params_of(req):
    return getattr(req, "lenvm_params", None)


def fault_of(req) -> Optional[str]:
    return getattr(req, "lenvm_fault", None)


def uses_lenvm(req) -> bool:
    """The request wants LenVM work (values or steering) and has not been quarantined."""
    p = params_of(req)
    return p is not None and p.uses_lenvm and fault_of(req) is None
