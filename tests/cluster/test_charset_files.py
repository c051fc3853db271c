"""common/charset.c against pydicom on pydicom's own character set examples.

Every file in pydicom's data/charset_files (the PS3.5 Annex H, I and J
examples, Latin, Greek, Cyrillic, Arabic, Hebrew, Japanese and Korean
multi-valued files, and sequences with their own Specific Character Set) is
read twice: once raw, once decoded by pydicom (ds.decode()). For every PN,
LO, SH, LT, ST, UT and UC value, in sequences too with the (0008,0005) in
force there, the raw bytes go through build/charset_tool (charset_to_utf8)
and the UTF-8 must equal pydicom's text. Conversion must be clean (no flag)
for these well-formed files.

Where pydicom and the standard disagree the standard wins and the exception
is listed in DIFFERENCES with the reason; pydicom 2.3's decoding of these
files needs none today, and the test fails if an entry stops being needed.

Run: /usr/bin/python3 -m pytest -q tests/cluster/test_charset_files.py
"""
import glob
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spcluster import BUILD  # noqa: E402

TOOL = BUILD / "charset_tool"
FILES = sorted(glob.glob(str(Path(pydicom.__file__).parent / "data" / "charset_files" / "*.dcm")))
TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC"}

# (file name, keyword) -> (what we expect, why pydicom differs). Empty: no
# file here needs an exception.
DIFFERENCES = {}


def to_utf8(scs, vr, raw: bytes):
    """(text, flags) of charset_tool for one raw value."""
    proc = subprocess.run([str(TOOL), "-" if scs is None else scs, vr, raw.hex()],
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    flags = int(proc.stderr.decode().strip().split("=")[1], 16)
    return proc.stdout.decode("utf-8")[:-1], flags


def pydicom_text(elem):
    """pydicom's decoded value as one string, values joined with '\\'."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def strip_padding(raw: bytes, vr):
    """Trailing padding, as pydicom strips it (and as the router will)."""
    raw = raw.rstrip(b" \x00")
    if vr == "PN":
        # pydicom drops empty trailing component groups ("Wang^XiaoDong=王^小東=").
        raw = raw.rstrip(b"=")
    return raw


def values(raw_ds, dec_ds, scs, path=""):
    """(path, vr, scs, raw bytes, pydicom's text) for every string value,
    descending into sequence items with the character set in force there."""
    own = raw_ds.get_item(0x00080005)
    if own is not None:
        scs = raw_ds.SpecificCharacterSet
        scs = "\\".join(scs) if isinstance(scs, pydicom.multival.MultiValue) else scs
    for tag in list(raw_ds.keys()):
        dec = dec_ds[tag]
        name = path + (dec.keyword or str(tag))
        if dec.VR == "SQ":
            for i, (r_item, d_item) in enumerate(zip(raw_ds[tag].value, dec.value)):
                yield from values(r_item, d_item, scs, f"{name}[{i}].")
        elif dec.VR in TEXT_VRS:
            raw = raw_ds.get_item(tag).value
            if isinstance(raw, bytes):
                yield name, dec.VR, scs, raw, pydicom_text(dec)


def cases():
    out = []
    warnings.simplefilter("ignore")
    for f in FILES:
        raw_ds = pydicom.dcmread(f)
        dec_ds = pydicom.dcmread(f)
        dec_ds.decode()
        for name, vr, scs, raw, text in values(raw_ds, dec_ds, None):
            out.append(pytest.param(Path(f).name, name, vr, scs, raw, text,
                                    id=f"{Path(f).name}:{name}"))
    return out


def test_files_found():
    assert len(FILES) >= 15, FILES
    assert TOOL.exists(), f"build {TOOL} first"


@pytest.mark.parametrize("fname,name,vr,scs,raw,text", cases())
def test_value_matches_pydicom(fname, name, vr, scs, raw, text):
    ours, flags = to_utf8(scs, vr, strip_padding(raw, vr))
    expected, _why = DIFFERENCES.get((fname, name), (text, None))
    if vr == "PN":
        expected = expected.rstrip("=")
    assert ours == expected, f"{fname} {name} under {scs!r}: {raw!r}"
    assert flags == 0, f"{fname} {name}: flags {flags:#x}"


def test_non_ascii_values_seen():
    """The comparison covers the interesting values, not only ASCII ones."""
    names = {(c.values[0], c.values[1]) for c in cases()
             if any(b >= 0x80 or b == 0x1B for b in c.values[4])}
    for f in ["chrArab.dcm", "chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrH31.dcm",
              "chrH32.dcm", "chrHbrw.dcm", "chrI2.dcm", "chrRuss.dcm", "chrX1.dcm",
              "chrX2.dcm", "chrKoreanMulti.dcm", "chrJapMulti.dcm"]:
        assert (f, "PatientName") in names, f
    assert ("chrSQEncoding.dcm", "RequestedProcedureCodeSequence[0].PatientName") in names
