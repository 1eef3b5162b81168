"""Built-in erasure methods: ReCARE and the ESD and UCE baselines (nothing heavy imported here)."""

from dataclasses import replace

from recare_cli.plugins import Method


def _run_as(method: str):
    def run(request, runtime, reporter):
        from recare_cli.erase.run import run_erase

        return run_erase(replace(request, method=method), runtime, reporter)

    return run


def register(register):
    register(Method(
        name="recare", run=_run_as("recare"),
        description="ReCARE: iterative erase + textual inversion, then a robust erase that keeps the CARE set",
    ))
    register(Method(
        name="esd", run=_run_as("esd"),
        description="ESD as published (esd_diffusers.py): Adam towards eps_from - eta (eps_concept - eps_neutral)",
    ))
    register(Method(
        name="uce", run=_run_as("uce"),
        description="UCE as published (uce_sd_erase.py): closed-form edit of the cross-attention keys and values",
    ))
