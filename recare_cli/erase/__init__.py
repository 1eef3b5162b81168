"""`recare erase`: the ReCARE method (recare-method.md §1-5) and the ESD and UCE baselines (§9).

A `Method` plugin's `run(request: EraseRequest, runtime: Runtime, reporter: Reporter) -> EraseResult`
trains from the request and writes the run directory described in `recare_cli.erase.run`; the CLI
calls it through `registry().method(name)`. Modules: params (what trains), denoise (the prefix),
guidance (targets), stage1 / inversion / stage2 (the training loops), loop (resume, checkpoints,
loss log), context (the models), request (the request, its validation and run hash), run (inputs,
outputs, stage order); esd and uce are the published baselines (esd_diffusers.py, uce_sd_erase.py;
docs/fidelity.md lists every difference).
"""
