"""The router process stays small: importing the server and the client never loads torch."""

from __future__ import annotations

import subprocess
import sys


def test_router_and_client_import_without_torch():
    code = (
        "import sys\n"
        "import pdserve.router.router, pdserve.router.server, pdserve.api.client\n"
        "import pdserve.cluster.remote_generate, pdserve.router.http\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'triton'))\n"
        "       or m.startswith(('pdserve.engine', 'pdserve.kernels', 'pdserve.prefill_worker',\n"
        "                        'pdserve.decode_worker'))]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
