"""The README's CPU example runs as written and prints what it says."""

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_cpu_example_runs_as_written():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Use it on a CPU", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    shape_and_err, counts, losses = printed.getvalue().splitlines()
    assert shape_and_err.startswith("torch.Size([4, 16, 256])") and float(shape_and_err.split()[-1]) <= 1e-6
    assert sum(int(c) for c in re.findall(r"\d+", counts)) == 4 * 16 * 2  # every token's two slots
    before, after = map(float, losses.split())
    assert after < before  # one optimizer step on the layer's gradients lowers its loss
