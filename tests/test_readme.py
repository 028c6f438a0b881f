"""The README's promises: its Python example runs as written, and its set-up commands are the Makefile's."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text()
    section = text[text.index(after_heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {after_heading!r}"
    return match.group(1)


def test_readme_set_up_is_two_make_targets():
    text = README.read_text()
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.smollm2
def test_readme_example_traces_a_fact_in_at_most_ten_lines(smollm2, monkeypatch):
    import recallscope

    code = _python_block("## Trace your own fact")
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 10
    monkeypatch.setattr(recallscope, "load_model", lambda spec, **kw: smollm2, raising=False)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    patched, trace = scope["patched"], scope["trace"]
    assert patched.axes == ("layer", "pos") and patched.values.shape[1] == 30
    # Patching the clean residual stream into layer 0 at the subject token makes the run clean again.
    subject = next(i for i, label in enumerate(patched.labels["pos"]) if "France" in label)
    torch.testing.assert_close(patched.normalized().mean()[0, subject], torch.tensor(1.0), atol=1e-4, rtol=0)
    assert trace.axes == ("layer", "token") and float(trace.clean[0]) > float(trace.corrupt[0])
    assert type(patched.normalized().plot()).__name__ == "Figure"


@pytest.mark.smollm2
def test_readme_attribution_example_runs(smollm2):
    code = _python_block("## Attribution and circuits")
    scope: dict = {"model": smollm2}
    exec(compile(code, "README.md", "exec"), scope)
    run = scope["run"]
    assert type(run.result.plot()).__name__ == "Figure" and run.figures
    # AtP's top site must carry a non-zero estimate of the France -> Spain logit-difference change.
    assert run.summary["top"] and abs(run.summary["top"][0][1]) > 0
