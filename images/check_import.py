"""Checks the archives `make images` wrote as a node would use them: a throwaway containerd (its own root, state
and socket under /tmp) imports each one with `ctr -n k8s.io images import`, must list it under its full ref,
and runs the image's smoke commands in a container with a read-only root filesystem (the smoke model that
`make images` prepared mounted at /smoke). Needs root, containerd,
ctr and runc; stops its containerd and removes its directory afterwards.

    python images/check_import.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from build import CACHE, INDEX, SMOKE

CONFIG = """version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{root}/containerd.sock"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the containerd directory (for a post-mortem)")
    options = parser.parse_args()
    entries = json.loads(INDEX.read_text())["images"]

    root = Path(tempfile.mkdtemp(prefix="edgeloop-images-containerd-"))
    (root / "config.toml").write_text(CONFIG.format(root=root))
    log = open(root / "containerd.log", "w")  # noqa: SIM115 (open as long as containerd runs)
    containerd = subprocess.Popen(["containerd", "--config", str(root / "config.toml")], stdout=log, stderr=log)
    ctr = ["ctr", "--address", str(root / "containerd.sock"), "--namespace", "k8s.io"]
    failures = 0
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or containerd.poll() is not None:
                sys.exit(f"check_import: containerd did not start; see {root / 'containerd.log'}")
            time.sleep(0.2)
        for entry in entries:
            started = time.monotonic()
            subprocess.run([*ctr, "images", "import", entry["archive"]], check=True, capture_output=True)
            seconds = time.monotonic() - started
            refs = subprocess.run([*ctr, "images", "ls", "-q"], check=True, capture_output=True, text=True).stdout
            listed = entry["ref"] in refs.split()
            print(f"{entry['ref']}: imported in {seconds:.1f} s, listed as {entry['ref']}: {'yes' if listed else 'NO'}")
            failures += not listed
            for number, command in enumerate(SMOKE[entry["name"]]):
                smoke = f"type=bind,src={CACHE / 'smoke'},dst=/smoke,options=rbind:ro"
                result = subprocess.run(
                    [
                        *ctr,
                        "run",
                        "--rm",
                        "--read-only",
                        "--mount",
                        smoke,
                        entry["ref"],
                        f"check-{entry['name']}-{number}",
                        *command,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                print(f"  {' '.join(command)[:70]}: {'ok' if result.returncode == 0 else 'FAILED'}")
                if result.returncode != 0:
                    failures += 1
                    print(result.stdout[-2000:] + result.stderr[-2000:])
        print(subprocess.run([*ctr, "images", "ls"], capture_output=True, text=True).stdout)
    finally:
        containerd.terminate()
        containerd.wait(timeout=30)
        log.close()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
