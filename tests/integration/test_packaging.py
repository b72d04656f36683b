"""What an installed fusionrec looks like from outside the repository (fresh interpreters)."""

import subprocess
import sys
from pathlib import Path


def _run(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_one_top_level_module_and_the_stages_under_it(tmp_path: Path):
    out = _run("import importlib.util as u, fusionrec.streams, fusionrec.models, fusionrec.online; "
               "print([m for m in ('streams', 'models', 'online') if u.find_spec(m)], "
               "fusionrec.streams.EventProducer.__module__)", tmp_path)
    assert out == "[] fusionrec.streams.producer"


def test_reader_api_does_not_import_torch_until_search(tmp_path: Path):
    code = ("import sys, redis, redis.asyncio\n"
            "from fusionrec import Settings\n"
            "from fusionrec.online.serving.api import Services, create_app\n"
            "s = Settings.from_env({}, redis_url='redis://127.0.0.1:1/0')\n"
            "create_app(Services(s, redis.Redis(port=1), redis.asyncio.Redis(port=1)))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'river') if m in sys.modules))")
    assert _run(code, tmp_path) == "[]"
