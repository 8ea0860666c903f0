import subprocess
import sys

HEAVY = ["torch", "transformers", "openai", "PySide6", "PyQt5", "qtpy", "glue", "glue_qt",
         "matplotlib"]


def test_importing_the_core_loads_no_heavy_module():
    code = ("import sys, glue_vlm, glue_vlm.tasks, glue_vlm.stamps, glue_vlm.store, "
            "glue_vlm.run, glue_vlm.columns, glue_vlm.cli, glue_vlm.backends.base, "
            "glue_vlm.demo, glue_vlm.reproduce, glue_vlm.evaluate, glue_vlm.parsing, "
            "glue_vlm.backends.openai, glue_vlm.backends.local\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
