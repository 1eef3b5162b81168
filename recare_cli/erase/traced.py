"""The erase loops' UNet calls on a CPU, run through TorchScript traces of the UNet.

Why: on a CPU a small UNet's forward spends a fifth of its time in diffusers' Python (module calls,
attention-processor dispatch, shape checks), not in its kernels. A trace replays the same aten ops
from C++: on `tiny-random` a batch-2 forward takes 16% less time and an inversion step (forward
and backward to the text) 13-15% less (bench/unet_trace.py), and its outputs and gradients are
bit-identical to the module's (tests/test_erase_traced.py). torch.compile's forward was no faster
than a trace's and took a minute to compile on the build machines' 2 cores.

What is traced is a function of the UNet's parameters and its inputs, so one trace serves the
current weights and a stage's frozen snapshot alike, and gradients reach whichever tensors are
passed (tracing the module instead would cost twice as long per trace and hold its weights). A
trace records one path through diffusers' Python: branches on shapes (the up-samplers' size
checks) and dropout's train/eval switch are fixed as they were when it was taken, so every (mode,
input shapes, dtypes) gets a trace of its own, once it has run TRACE_AFTER times. Taking one runs the forward once, with the RNG's
state put back after. Traces run with TorchScript's graph optimizations off, since its profiling
executor would swap autograd's gradients for its own and move results by ~1e-9.

Only on a CPU, in float32 (`EraseModels.eps` leaves autocast to the module) and without gradient
checkpointing (which a trace would drop). A traced call runs none of the UNet's Python hooks: code
that hooks it sets `models.traces = None`. RECARE_TRACE_UNET=0 turns tracing off; a UNet that
cannot be traced runs as a module.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

TRACE_VARIABLE = "RECARE_TRACE_UNET"
# A signature runs as a module this many times before it is traced: on `tiny-random` a trace costs
# ~0.2 s and saves ~5 ms a call, so the few calls of a short run (or a test) are not worth one.
TRACE_AFTER = 32


class UNetTraces:
    """Call the UNet through a trace per input signature, taken once that signature has run TRACE_AFTER times."""

    def __init__(self, unet, on_trace):
        self.unet = unet
        self.on_trace = on_trace  # a context entered around each trace (it runs the module's forward once)
        self.names = [name for name, _ in unet.named_parameters()]
        # A parameter two modules share would stay a constant in one of them: such a UNet is not traced.
        self.traceable = len(self.names) == len(list(unet.named_parameters(remove_duplicate=False)))
        # Where each parameter lives, to put a traced call's tensors in its place.
        self._slots = [(unet.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in self.names]
        self._traces: dict = {}
        self._module_calls: dict = {}

    @staticmethod
    def wanted(device: str) -> bool:
        return torch.device(device).type == "cpu" and os.environ.get(TRACE_VARIABLE, "1").strip() != "0"

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                 weights: dict | None = None) -> torch.Tensor | None:
        """The UNet's output with `weights` in place of those parameters, or None where it must run
        as a module (then nothing ran)."""
        if self.unet.is_gradient_checkpointing or not self.traceable:
            return None
        inputs = [sample, timestep, encoder_hidden_states]
        if added_cond_kwargs is not None:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        key = (self.unet.training, *((tuple(x.shape), x.dtype, x.device) for x in inputs))
        if key not in self._traces:
            self._module_calls[key] = self._module_calls.get(key, 0) + 1
            if self._module_calls[key] < TRACE_AFTER:
                return None
            self._traces[key] = self._trace(inputs, sdxl=added_cond_kwargs is not None)
        trace = self._traces[key]
        if trace is None:
            return None
        params = [module._parameters[leaf] for module, leaf in self._slots]
        if weights:
            params = [weights.get(name, p) for name, p in zip(self.names, params)]
        with torch.jit.optimized_execution(False):
            return trace(params, *inputs)

    def _trace(self, inputs: list, sdxl: bool):
        def forward(params, sample, timestep, encoder_hidden_states, *added):
            added_cond_kwargs = {"text_embeds": added[0], "time_ids": added[1]} if sdxl else None
            with self._parameters_in_place(params):
                return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

        params = [module._parameters[leaf].detach() for module, leaf in self._slots]
        example = (params, *(x.detach() for x in inputs))
        with warnings.catch_warnings():
            # The deprecation notice and the tracer's warnings about the shape branches above.
            warnings.simplefilter("ignore")
            try:
                # Taking a trace runs the forward once: its dropout (if any) must not draw from the run's RNG.
                with torch.no_grad(), torch.random.fork_rng(devices=[]), self.on_trace():
                    return torch.jit.trace(forward, example, check_trace=False)
            except Exception:  # noqa: BLE001 -- any failure to trace leaves the module's own forward, which is always right
                return None

    @contextlib.contextmanager
    def _parameters_in_place(self, params: list):
        """The module's forward reads `params` as its parameters (torch.func.functional_call refuses a trace)."""
        saved = [module._parameters[leaf] for module, leaf in self._slots]
        try:
            for (module, leaf), p in zip(self._slots, params, strict=True):
                module._parameters[leaf] = p
            yield
        finally:
            for (module, leaf), p in zip(self._slots, saved):
                module._parameters[leaf] = p
