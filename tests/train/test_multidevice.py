"""The train step on 8 fake CPU devices (data x fsdp meshes, FSDP-sharded params, gradient
accumulation) equals the 1-device step."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_eight_devices_equal_one(tmp_path):
    out = tmp_path / "mesh.npz"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "_driver.py"), "mesh", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    z = np.load(out)
    names = [k.split("/", 1)[1] for k in z.files if k.startswith("one/") and "__" not in k]
    assert len(names) > 5
    assert int(z["one/__ndev"]) == 1
    for arm in ("dp2_fsdp4_accum2",):
        assert bool(z[f"{arm}/__sharded"]), f"{arm}: parameters were not FSDP-sharded"
        assert int(z[f"{arm}/__ndev"]) == 8
        np.testing.assert_allclose(z[f"{arm}/__losses"], z["one/__losses"], rtol=1e-6)
        for k in names:
            np.testing.assert_allclose(
                z[f"{arm}/{k}"], z[f"one/{k}"], rtol=1e-5, atol=2e-6, err_msg=f"{arm}: {k}"
            )
    # training moved the parameters (the comparison is not vacuous)
    assert not np.allclose(z["one/__losses"][0], z["one/__losses"][-1])
