"""The OHIF Viewer (deploy/viewer.sh) served by the router at /viewer/, in a
real browser: Debian's chromium, headless, driven by puppeteer-core
(tests/cluster/viewer_probe.js).

One cluster (3 nodes, one router with DICOMweb, authentication on, the
viewer's page sending a demo user's Basic credentials) holding a CT series
of 512x512 instances and a few other studies, stored over DICOM. At a
desktop (1280x800) and a phone (390x844) viewport: the study list shows the
test studies' patient names and descriptions, and opening the CT study
draws an image (the viewport canvas' pixels are not all one value).
Screenshots are kept in SP_BUILD_DIR/artifacts/viewer-*.png.

Needs: chromium (deploy/install-deps.sh), node and npm; puppeteer-core
(pinned) is installed into SP_BUILD_DIR/npm and the @ohif/app tarball cached
in SP_BUILD_DIR/npm-ohif by the test itself (the npm registry). Skipped,
saying why, only when chromium or npm is missing and cannot be installed.

Run: /usr/bin/python3 -m pytest -q -s tests/cluster/test_viewer.py
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("SP_BUILD_DIR", REPO / "build"))
PUPPETEER = "puppeteer-core@24.10.0"
CHROMIUM = "/usr/bin/chromium"
NAMES = ["Bulk, Patient001", "Bulk, Patient002", "Other, Alice", "Other, Bob"]
# On a phone the list shows the patient column only.
VIEWPORTS = [{"name": "desktop", "width": 1280, "height": 800,
              "expectText": NAMES + ["Bulk study 3", "Other study 2"]},
             {"name": "phone", "width": 390, "height": 844, "mobile": True, "expectText": NAMES}]
OTHER_NAMES = ["Other^Alice", "Other^Bob"]


def ensure_chromium():
    if os.access(CHROMIUM, os.X_OK):
        return None
    if os.geteuid() == 0:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            "chromium"], capture_output=True, text=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode == 0 and os.access(CHROMIUM, os.X_OK):
            return None
        return f"chromium could not be installed (apt-get: {r.stderr.strip()[-200:]})"
    return "chromium is not installed and this is not root (deploy/install-deps.sh installs it)"


def ensure_puppeteer() -> Path:
    npm_dir = BUILD / "npm"
    if not (npm_dir / "node_modules" / "puppeteer-core" / "package.json").exists():
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                        "--prefix", str(npm_dir), PUPPETEER], check=True, timeout=600,
                       env={**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1"})
    return npm_dir / "node_modules"


@pytest.fixture(scope="module")
def browser_env():
    why = ensure_chromium()
    if why:
        pytest.skip(why)
    if not shutil.which("npm") or not shutil.which("node"):
        pytest.skip("node/npm not installed: cannot install puppeteer-core or the viewer")
    return ensure_puppeteer()


@pytest.fixture(scope="module")
def site(tmp_path_factory, browser_env):
    root = tmp_path_factory.mktemp("viewer")
    users, key = root / "users", root / "token.key"
    password = root / "viewer.password"
    password.write_text("demo viewer password")
    subprocess.run([str(sc.ROUTER_BIN), "user", "add", str(users), "viewer"], check=True,
                   capture_output=True,
                   env={**os.environ, "SHARDPACS_PASSWORD": password.read_text()})
    subprocess.run([str(sc.ROUTER_BIN), "token-key", str(key)], check=True, capture_output=True)
    viewer = root / "site"
    subprocess.run([str(REPO / "deploy" / "viewer.sh"), str(viewer), "--cache",
                    str(BUILD / "npm-ohif"), "--basic", "viewer", str(password)],
                   check=True, timeout=900)
    port = sc.free_port()
    http = {"port": str(port), "bind": "127.0.0.1", "users": str(users),
            "token_key": str(key), "viewer_dir": str(viewer)}
    c = sc.cluster(root / "c", nodes=3, router_extra={"http": http})
    try:
        sc.wait_port(port)
        # A CT series of 512x512 instances (one study), two more CT studies,
        # and two studies of 64x64 images under other patients' names.
        ct = gen.make_bulk_set(root / "ct", small=0, ct=18, studies=3, seed=0)
        other = gen.make_bulk_set(root / "other", small=4, ct=0, studies=2, seed=1)
        for i, p in enumerate(other.small_paths):
            ds = pydicom.dcmread(str(p))
            ds.PatientName = OTHER_NAMES[i % 2]
            ds.PatientID = f"OTHER-{i % 2}"
            ds.StudyDescription = f"Other study {i % 2 + 1}"
            ds.save_as(str(p))
        files = [str(p) for p in ct.ct_paths + other.small_paths]
        out = sc.dcmtk(["storescu", "-aec", "SHARDPACS", "127.0.0.1", str(c.router.port)]
                       + files, timeout=120)
        assert out.returncode == 0, out.stderr
        yield {"origin": f"http://127.0.0.1:{port}", "study": ct.study_uids[0],
               "node_modules": browser_env, "root": root}
    finally:
        c.stop()


def test_viewer_study_list_and_image(site):
    out_dir = BUILD / "artifacts"
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = site["root"] / "chrome-profile"
    cfg = {"origin": site["origin"], "chromium": CHROMIUM, "userDataDir": str(profile),
           "outDir": str(out_dir), "study": site["study"], "viewports": VIEWPORTS,
           "timeoutMs": 60000}
    cfg_path = site["root"] / "probe.json"
    cfg_path.write_text(json.dumps(cfg))
    r = subprocess.run(["node", str(REPO / "tests" / "cluster" / "viewer_probe.js"),
                        str(cfg_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NODE_PATH": str(site["node_modules"])})
    assert r.stdout.strip(), r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in res, res["error"]
    for vp in res["viewports"]:
        print(f"\n{vp['name']}: study list {vp['listMs']} ms -> {vp['listShot']}")
        print(f"{vp['name']}: image {vp['imageMs']} ms, canvas {vp['canvas']} -> {vp['imageShot']}")
    failed = [f for f in res["failedRequests"] if "/dicom-web/" in f]
    for vp in res["viewports"]:
        assert vp["listOk"], (vp["name"], vp["listText"][:1500], res["failedRequests"][:20])
        assert vp["imageOk"], (vp["name"], vp["canvas"], vp["viewerText"][:800],
                               res["failedRequests"][:20], res["consoleErrors"][:20])
        assert vp["canvas"]["distinct"] >= 16 and vp["canvas"]["max"] > vp["canvas"]["min"]
        assert vp["canvas"]["width"] > 200, vp["canvas"]
    # Every DICOMweb request the page made was answered (authentication
    # included: the page sent the demo credentials).
    assert not failed, failed[:20]
