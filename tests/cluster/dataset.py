"""Deterministic DICOM test data for ShardPACS cluster tests and benchmarks.

Two generators, both seeded (the same seed gives byte-identical files):

* ``make_test_set(outdir)`` -> :class:`DataSet`: 7 patients, 11 studies,
  48 instances (CT, MR, Secondary Capture, Basic Text SR) in names and
  descriptions encoded in ISO_IR 100 (Latin-1), ISO_IR 192 (UTF-8: Spanish,
  Greek, Cyrillic) and plain ASCII (no Specific Character Set), stored in
  six transfer syntaxes (explicit/implicit VR little endian, RLE Lossless,
  JPEG Lossless SV1, JPEG Baseline on 8-bit SC, JPEG-LS Lossless). The
  compressed files are made with DCMTK's own command line tools (dcmcrle,
  dcmcjpeg, dcmcjpls). Sequences written by pydicom (the SR content tree,
  the image's procedure code) and by the DCMTK tools (run with ``-e``) use
  undefined lengths. The DataSet knows every indexed attribute as a
  decoded Python str (read back from the final files), the per-level
  records with their computed counts, and ``expected_find`` computes the
  C-FIND result a conforming SCP gives, without a server.

* ``make_bulk_set(outdir, small=2000, ct=1000, studies=20)`` -> :class:`BulkSet`:
  many 64x64 16-bit CT instances (~9.9 KB files) and 512x512 16-bit CT
  instances (~526 KB files) in explicit VR little endian, written fast for
  benchmarks (one pixel buffer per kind; the first 8 pixels of each
  instance carry its kind and index so no two objects are identical).

Reading C-FIND results of DCMTK's findscu: the robust way is ``findscu -X
-od DIR`` (``--extract``), which writes each pending response's identifier
as DIR/rsp0001.dcm, rsp0002.dcm, ... (numbered in arrival order; findscu
writes them into ``-od``, default the cwd). ``read_findscu_responses(DIR)``
reads them with pydicom, decoding each with its own Specific Character Set;
``run_findscu(...)`` does both steps. ``parse_findscu_output(text)`` parses
the data set dumps findscu writes to stderr instead: without -X it logs
every pending response at INFO level ("I: Find Response: N (Pending)" and a
dcmdump-style dump), shown by default without -v; with -X only when +sr is
given. It is kept for logs, but the dumps hold raw bytes in the response's
character set and abbreviate values longer than 64 characters, so prefer -X.

All DCMTK tools are run with TCP_NODELAY=1 in their environment (Debian's
DCMTK 3.6.7 reads it on every connection and otherwise leaves Nagle's
algorithm on, so each network exchange stalls for 45-90 ms); for the file
tools it is irrelevant but harmless.

Command line (writes files; prints a summary):
    /usr/bin/python3 tests/cluster/dataset.py OUTDIR [--small N] [--ct N]
        [--studies N] [--seed N] [--no-test-set]
  OUTDIR/testset/*.dcm and OUTDIR/testset.json (the instance records);
  OUTDIR/bulk/{small,ct}/*.dcm when --small or --ct is given.
"""
import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

# ---- constants -----------------------------------------------------------------

UID_ROOT = "1.2.826.0.1.3680043.8.498"
TEST_ROOT = UID_ROOT + ".71"   # make_test_set: TEST_ROOT.<seed>.<level>.<p>.<st>[.<se>[.<i>]]
BULK_ROOT = UID_ROOT + ".72"   # make_bulk_set: BULK_ROOT.<seed>.<level>....

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# short name used in plans and file names -> transfer syntax UID
TS_BY_NAME = {"ele": EXPLICIT_LE, "ile": IMPLICIT_LE, "rle": RLE_LOSSLESS,
              "jll": JPEG_LOSSLESS_SV1, "jpb": JPEG_BASELINE, "jls": JPEG_LS_LOSSLESS}
COMPRESSED = {RLE_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_BASELINE, JPEG_LS_LOSSLESS}

# the DCMTK command that makes each compressed syntax from an explicit VR file
# (-e: undefined-length sequences and items; +un: keep the SOP Instance UID
# also for lossy JPEG baseline)
COMPRESS_CMD = {
    RLE_LOSSLESS: ["dcmcrle", "-e"],
    JPEG_LOSSLESS_SV1: ["dcmcjpeg", "+e1", "-e"],
    JPEG_BASELINE: ["dcmcjpeg", "+eb", "+un", "-e"],
    JPEG_LS_LOSSLESS: ["dcmcjpls", "+el", "-e"],
}

# the storescu option that proposes a file's transfer syntax, so that storescu
# sends it as stored instead of converting it (it still re-encodes the data set)
STORESCU_PROPOSE = {
    EXPLICIT_LE: "-xe", IMPLICIT_LE: "-xi", RLE_LOSSLESS: "-xr",
    JPEG_LOSSLESS_SV1: "-xs", JPEG_BASELINE: "-xy", JPEG_LS_LOSSLESS: "-xt",
}

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")

PATIENT_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex"]
STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "ReferringPhysicianName", "StudyDescription"]
SERIES_KEYS = ["Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription"]
INSTANCE_KEYS = ["SOPInstanceUID", "SOPClassUID", "InstanceNumber"]
INDEXED = PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS + INSTANCE_KEYS + ["SpecificCharacterSet"]

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# attributes that are not matching keys in a C-FIND identifier
NOT_MATCHING = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
# VRs on which * and ? are wildcards (PS3.4 C.2.2.2.4)
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}


def run_tool(args, timeout=120):
    """Runs a DCMTK tool with TCP_NODELAY=1; raises with its output on failure."""
    args = [str(a) for a in args]
    p = subprocess.run(args, env=DCMTK_ENV, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n"
                           f"{p.stdout.decode(errors='replace')}\n"
                           f"{p.stderr.decode(errors='replace')}")
    return p


# ---- the plan of the test set -------------------------------------------------------

# patient: (name, id, charset or None, birth date, sex, studies)
# study:   (date, time, accession, study id, referring physician, description, series)
# series:  (modality/kind, number, description, [transfer syntax per instance]
#           [, (rows, columns)])  -- images are 64x64 unless given
#   kind "CT" (12 bit), "CTS" (signed 16 bit CT), "MR" (16 bit), "SC" (8-bit grey),
#   "SCRGB" (8-bit RGB), "SR" (Basic Text SR)
PLAN = [
    ("Müller^Jürgen", "SPT0001", "ISO_IR 100", "19580312", "M", [
        ("20210315", "083012", "ACC21-0315", "4711", "Weiß^Kläre", "CT Schädel nativ", [
            ("CT", 1, "Axial 5mm Hirn", ["ele", "ele", "ile", "rle"], (256, 256)),
            ("CT", 2, "Koronar Rekonstruktion", ["jll", "jll"]),
        ]),
        ("20231102", "141500.250", "ACC23-1102", "4712", "Groß^Björn", "MRT Knie rechts", [
            ("MR", 1, "T1 sagittal", ["ile", "ile", "ile"]),
            ("MR", 2, "PD fettgesättigt", ["jls", "jls", "jls"]),
            ("SR", 99, "Befundbericht", ["ele"]),
        ]),
    ]),
    ("Ñúñez^José", "SPT0002", "ISO_IR 192", "19800704", "M", [
        ("20220630", "101500", "ACC22-0630", "1", "Pérez^Ana", "TC Tórax con contraste", [
            ("CT", 1, "Pulmón 1mm", ["ele", "rle", "rle", "jll"], (256, 256)),
            ("CT", 2, "Mediastino", ["ile", "ele"]),
            ("SC", 300, "Captura de pantalla", ["jpb"]),
        ]),
    ]),
    ("Παπαδοπούλου^Ελένη", "SPT0003", "ISO_IR 192", "19921120", "F", [
        ("20190107", "0930", "ACC19-0107", "77", "Γεωργίου^Νίκος",
         "Μαγνητική τομογραφία εγκεφάλου", [
             ("MR", 1, "T2 αξονική", ["ele", "ele", "jls"], (128, 128)),
             ("MR", 2, "FLAIR", ["ile", "rle"]),
             ("SR", 100, "Γνωμάτευση", ["ile"]),
         ]),
        ("20240229", "235959", "ACC24-0229", "78", "Ζαχαρίου^Μαρία", "Αξονική κοιλίας", [
            ("CT", 1, "Φλεβική φάση", ["jll", "ele", "ile"]),
        ]),
    ]),
    ("Иванова^Анна", "SPT0004", "ISO_IR 192", "19751231", "F", [
        ("20200815", "120000", "ACC20-0815", "5", "Петров^Сергей",
         "КТ органов грудной клетки", [
             ("CT", 1, "Лёгкие", ["ele", "ele", "ele"]),
             ("SCRGB", 2, "Скриншот", ["ele", "rle"]),
         ]),
    ]),
    ("Doe^John", "SPT0005", None, "19600101", "M", [
        ("19991231", "070000", "ACC99-1231", "101", "House^Gregory", "CT HEAD W/O CONTRAST", [
            ("CT", 1, "", ["ile", "ile"]),
        ]),
        ("20210316", "160512.5", "ACC21-0316", "102", "Wilson^James", "MR KNEE LEFT", [
            ("MR", 1, "SAG PD", ["ele", "rle"], (96, 80)),
            ("MR", 2, "AX T2", ["jls", "jll"]),
        ]),
        ("20220101", "000000", "ACC22-0101", "103", "Cuddy^Lisa", "CHEST REPORT", [
            ("SR", 1, "Report", ["ele"]),
            ("SCRGB", 2, "Key images", ["jpb"]),
        ]),
    ]),
    ("DOE^JANE", "SPT0006", None, "19851010", "F", [
        ("20230704", "093000", "ACC23-0704", "10", "Doe^John", "CT ABDOMEN", [
            ("CTS", 1, "ABD 3mm", ["ele", "ile", "rle"], (512, 512)),
        ]),
    ]),
    ("Lefèvre^Amélie", "SPT0007", "ISO_IR 100", "19900214", "O", [
        ("20181105", "111111", "ACC18-1105", "900", "Benoît^Cécile", "IRM genou", [
            ("MR", 1, "Séquence T1", ["ele", "jls"]),
            ("MR", 2, "DP fat sat", ["ile"]),
        ]),
    ]),
]

SR_TEXT = {
    None: ["No acute abnormality.", "Mild degenerative change."],
    "ISO_IR 100": ["Kein Nachweis einer Fraktur. Gelenkerguss mäßig.", "Menisken unauffällig."],
    "ISO_IR 192": ["Χωρίς παθολογικά ευρήματα.", "Sin hallazgos. Без патологии."],
}


# ---- building the objects -----------------------------------------------------------

def _code(value, scheme, meaning):
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _undefined_lengths(ds):
    """Marks every sequence and item of ds (recursively) for undefined-length
    encoding."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def _phantom(rng, rows, cols, lo, hi, dtype):
    """A deterministic phantom: noisy background, a body ellipse, some discs."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = rows / 2, cols / 2
    img = rng.uniform(lo, lo + (hi - lo) * 0.05, size=(rows, cols))
    body = ((yy - cy) / (rows * 0.42)) ** 2 + ((xx - cx) / (cols * 0.36)) ** 2 <= 1
    img[body] = lo + (hi - lo) * 0.4 + rng.normal(0, (hi - lo) * 0.02, size=body.sum())
    for _ in range(4):
        r = rng.uniform(rows * 0.05, rows * 0.15)
        y, x = rng.uniform(rows * 0.3, rows * 0.7), rng.uniform(cols * 0.3, cols * 0.7)
        img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = rng.uniform(lo + (hi - lo) * 0.5, hi)
    info = np.iinfo(dtype)
    return np.clip(np.rint(img), max(lo, info.min), min(hi, info.max)).astype(dtype)


def _set_pixels(ds, kind, rng, rows=64, cols=64):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    if kind in ("CT", "CTS"):
        ds.BitsAllocated = 16
        if kind == "CT":
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            arr = _phantom(rng, rows, cols, 0, 4095, np.uint16)
            ds.RescaleIntercept = "-1024"
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            arr = _phantom(rng, rows, cols, -1024, 2000, np.int16)
            ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
    elif kind == "MR":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        arr = _phantom(rng, rows, cols, 0, 3000, np.uint16)
    elif kind == "SC":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        arr = _phantom(rng, rows, cols, 0, 255, np.uint8)
    elif kind == "SCRGB":
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        arr = np.stack([_phantom(rng, rows, cols, 0, 255, np.uint8) for _ in range(3)],
                       axis=-1)
    else:
        raise ValueError(kind)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _sr_content(charset, rng):
    texts = SR_TEXT[charset]
    findings = Dataset()
    findings.RelationshipType = "CONTAINS"
    findings.ValueType = "CONTAINER"
    findings.ConceptNameCodeSequence = Sequence([_code("121070", "DCM", "Findings")])
    findings.ContinuityOfContent = "SEPARATE"
    items = []
    for text in texts:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
        item.TextValue = text
        items.append(item)
    findings.ContentSequence = Sequence(items)
    impression = Dataset()
    impression.RelationshipType = "CONTAINS"
    impression.ValueType = "TEXT"
    impression.ConceptNameCodeSequence = Sequence([_code("121073", "DCM", "Impression")])
    impression.TextValue = texts[int(rng.integers(len(texts)))]
    return Sequence([findings, impression])


def _make_instance(seed, pi, si, ri, ii, patient, study, series, rng):
    name, pid, charset, birth, sex, _ = patient
    date, tm, acc, sid, ref, sdesc, _ = study
    kind, number, rdesc = series[:3]
    rows, cols = series[4] if len(series) > 4 else (64, 64)
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    modality = {"CT": "CT", "CTS": "CT", "MR": "MR", "SC": "OT", "SCRGB": "OT",
                "SR": "SR"}[kind]
    ds.SOPClassUID = {"CT": CT_IMAGE, "MR": MR_IMAGE, "SR": BASIC_TEXT_SR}.get(modality,
                                                                             SC_IMAGE)
    base = f"{TEST_ROOT}.{seed}"
    ds.SOPInstanceUID = f"{base}.3.{pi}.{si}.{ri}.{ii}"
    ds.StudyDate = date
    ds.StudyTime = tm
    ds.ContentDate = date
    ds.ContentTime = tm
    ds.AccessionNumber = acc
    ds.Modality = modality
    ds.Manufacturer = "ShardPACS test generator"
    ds.ReferringPhysicianName = ref
    ds.StudyDescription = sdesc
    ds.SeriesDescription = rdesc
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.StudyInstanceUID = f"{base}.1.{pi}.{si}"
    ds.SeriesInstanceUID = f"{base}.2.{pi}.{si}.{ri}"
    ds.StudyID = sid
    ds.SeriesNumber = str(number)
    ds.InstanceNumber = str(ii)
    if modality == "SR":
        ds.ValueType = "CONTAINER"
        ds.ConceptNameCodeSequence = Sequence([_code("11528-7", "LN", "Radiology Report")])
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.ReferencedPerformedProcedureStepSequence = Sequence([])  # type 2, empty
        ds.PerformedProcedureCodeSequence = Sequence([])
        ds.ContentSequence = _sr_content(charset, rng)
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality in ("CT", "MR") else \
            ["DERIVED", "SECONDARY"]
        ds.ProcedureCodeSequence = Sequence([_code("P-" + acc[-4:], "99SPT", sdesc or "x")])
        if modality in ("CT", "MR"):
            ds.FrameOfReferenceUID = f"{base}.4.{pi}.{si}"
            ds.PositionReferenceIndicator = ""
            ds.SliceThickness = "5"
            ds.ImagePositionPatient = ["-160", "-160", f"{ii * 5.0:.1f}"]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.PixelSpacing = [f"{320 / rows:g}", f"{320 / cols:g}"]
            ds.SliceLocation = f"{ii * 5.0:.1f}"
            if modality == "CT":
                ds.KVP = "120"
            else:
                ds.ScanningSequence = "SE"
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = "2D"
                ds.EchoTime = "15"
                ds.RepetitionTime = "500"
                ds.MagneticFieldStrength = "1.5"
        else:
            ds.ConversionType = "WSD"
        _set_pixels(ds, kind, rng, rows, cols)
    _undefined_lengths(ds)
    return ds


def _save(ds, path, ts):
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fm.TransferSyntaxUID = ts
    fm.ImplementationClassUID = UID_ROOT + ".71.0"
    fm.ImplementationVersionName = "SPTESTGEN"
    ds.file_meta = fm
    ds.is_little_endian = True
    ds.is_implicit_VR = ts == IMPLICIT_LE
    ds.save_as(str(path), write_like_original=False)


def _value(ds, keyword):
    """An attribute of a pydicom data set as a decoded str ("" when absent);
    multiple values joined with a backslash."""
    if keyword not in ds:
        return ""
    v = ds.data_element(keyword).value
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def record_from_dataset(ds) -> Dict[str, str]:
    """keyword -> decoded str for every indexed attribute of a data set."""
    return {k: _value(ds, k) for k in INDEXED}


# ---- the data set description -------------------------------------------------------

def _split(value):
    return [v for v in value.split("\\")] if value else []


class DataSet:
    """What make_test_set wrote: one record (dict keyword -> str) per file.

    Each instance record holds every attribute of INDEXED as a decoded str
    ("" when absent or empty), plus "path" and "TransferSyntaxUID". All
    values are str, including numbers (SeriesNumber "2") and the computed
    counts of the level records ("5"); multi-valued attributes
    (ModalitiesInStudy, SOPClassesInStudy, SpecificCharacterSet) are joined
    with a backslash, sorted where the order has no meaning."""

    def __init__(self, root: Path, records: List[Dict[str, str]], seed: int = 0):
        self.root = Path(root)
        self.records = sorted(records, key=lambda r: (r["PatientID"], r["StudyInstanceUID"],
                                                      int(r["SeriesNumber"] or 0),
                                                      r["SeriesInstanceUID"],
                                                      int(r["InstanceNumber"] or 0)))
        self.seed = seed

    # -- simple views
    def __len__(self):
        return len(self.records)

    def paths(self) -> List[Path]:
        return [Path(r["path"]) for r in self.records]

    def by_transfer_syntax(self) -> Dict[str, List[Path]]:
        out = {}
        for r in self.records:
            out.setdefault(r["TransferSyntaxUID"], []).append(Path(r["path"]))
        return out

    def transfer_syntaxes(self):
        return {r["TransferSyntaxUID"] for r in self.records}

    def character_sets(self):
        return {r["SpecificCharacterSet"] for r in self.records}

    def record(self, sop_instance_uid) -> Dict[str, str]:
        for r in self.records:
            if r["SOPInstanceUID"] == sop_instance_uid:
                return dict(r)
        raise KeyError(sop_instance_uid)

    def storescu_batches(self):
        """[(storescu proposal option, [paths])]: send each batch with its
        option so storescu offers the stored transfer syntax."""
        return [(STORESCU_PROPOSE[ts], paths)
                for ts, paths in sorted(self.by_transfer_syntax().items())]

    # -- level records
    def instances(self) -> List[Dict[str, str]]:
        return [dict(r) for r in self.records]

    def series(self) -> List[Dict[str, str]]:
        groups = {}
        for r in self.records:
            groups.setdefault(r["SeriesInstanceUID"], []).append(r)
        out = []
        for uid, rs in groups.items():
            rec = {k: rs[0][k] for k in PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS}
            rec["SpecificCharacterSet"] = rs[0]["SpecificCharacterSet"]
            rec["NumberOfSeriesRelatedInstances"] = str(len(rs))
            out.append(rec)
        return out

    def studies(self) -> List[Dict[str, str]]:
        groups = {}
        for r in self.records:
            groups.setdefault(r["StudyInstanceUID"], []).append(r)
        out = []
        for uid, rs in groups.items():
            rec = {k: rs[0][k] for k in PATIENT_KEYS + STUDY_KEYS}
            rec["SpecificCharacterSet"] = rs[0]["SpecificCharacterSet"]
            rec["NumberOfStudyRelatedSeries"] = str(len({r["SeriesInstanceUID"] for r in rs}))
            rec["NumberOfStudyRelatedInstances"] = str(len(rs))
            rec["ModalitiesInStudy"] = "\\".join(sorted({r["Modality"] for r in rs}))
            rec["SOPClassesInStudy"] = "\\".join(sorted({r["SOPClassUID"] for r in rs}))
            out.append(rec)
        return out

    def patients(self) -> List[Dict[str, str]]:
        groups = {}
        for r in self.records:
            groups.setdefault(r["PatientID"], []).append(r)
        out = []
        for pid, rs in groups.items():
            rec = {k: rs[0][k] for k in PATIENT_KEYS}
            rec["SpecificCharacterSet"] = rs[0]["SpecificCharacterSet"]
            rec["NumberOfPatientRelatedStudies"] = str(len({r["StudyInstanceUID"] for r in rs}))
            rec["NumberOfPatientRelatedSeries"] = str(len({r["SeriesInstanceUID"] for r in rs}))
            rec["NumberOfPatientRelatedInstances"] = str(len(rs))
            out.append(rec)
        return out

    def level_records(self, level: str) -> List[Dict[str, str]]:
        level = level.upper()
        if level == "INSTANCE":
            level = "IMAGE"
        return {"PATIENT": self.patients, "STUDY": self.studies, "SERIES": self.series,
                "IMAGE": self.instances}[level]()

    # -- C-FIND
    def expected_find(self, level: str, keys: Dict[str, str], pn_case_insensitive=False,
                      project=False) -> List[Dict[str, str]]:
        """The records a C-FIND at `level` with identifier `keys` (keyword ->
        query value str; "" = return key only) matches, per PS3.4 C.2.2.2.

        Every record of the level is tested against every key with a
        non-empty value, regardless of the query model's hierarchy (as in a
        relational query); QueryRetrieveLevel and SpecificCharacterSet are
        not matching keys. A non-empty key the level's records do not have
        raises ValueError. With project=True each result holds only the
        requested keys ("" for keys the level does not know, as an SCP
        returns them). Results are sorted by the level's unique key."""
        recs = self.level_records(level)
        known = set(recs[0]) if recs else set()
        for k, v in keys.items():
            if k in NOT_MATCHING or v in ("", None):
                continue
            if k not in known:
                raise ValueError(f"{k} is not an attribute of {level} records")
        out = [r for r in recs
               if all(k in NOT_MATCHING or v in ("", None) or
                      match_value(k, str(v), r[k], pn_case_insensitive)
                      for k, v in keys.items())]
        unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
                  "SERIES": "SeriesInstanceUID"}.get(level.upper(), "SOPInstanceUID")
        out.sort(key=lambda r: r[unique])
        if project:
            out = [{k: r.get(k, "") for k in keys if k not in NOT_MATCHING} for r in out]
        return out

    # -- persistence
    def to_json(self, path):
        Path(path).write_text(json.dumps({"root": str(self.root), "seed": self.seed,
                                          "instances": self.records},
                                         ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def from_json(cls, path):
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(Path(d["root"]), d["instances"], d["seed"])


# ---- matching (PS3.4 C.2.2.2) -------------------------------------------------------

_COMPUTED_VR = {"ModalitiesInStudy": "CS", "SOPClassesInStudy": "UI"}


def _vr(keyword):
    if keyword in _COMPUTED_VR:
        return _COMPUTED_VR[keyword]
    try:
        return dictionary_VR(keyword)
    except KeyError:
        return "LO"


def _wild_regex(query):
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in query), re.DOTALL)


def _norm_time(t, upper):
    """TM -> 12 digits HHMMSSFFFFFF; a partial upper bound is padded with 9s."""
    t = t.strip().replace(":", "")
    if "." in t:
        hms, frac = t.split(".", 1)
    else:
        hms, frac = t, ""
    if upper and not frac and len(hms) < 6:
        return (hms + "9" * 12)[:12]
    return (hms.ljust(6, "0") + frac.ljust(6, "9" if upper else "0"))[:12]


def _range_match(vr, query, value):
    lo, hi = query.split("-", 1)
    lo, hi = lo.strip(), hi.strip()
    if vr == "TM":
        v = _norm_time(value, False)
        return ((not lo or _norm_time(lo, False) <= v) and
                (not hi or v <= _norm_time(hi, True)))
    # DA (YYYYMMDD) and DT compare as strings; a DT upper bound is padded
    if vr == "DT" and hi:
        hi = hi + "9" * (21 - len(hi))
    return (not lo or lo <= value) and (not hi or value <= hi)


def _single_match(vr, query, value, pn_ci):
    query = query.rstrip(" ")
    value = value.rstrip(" ")
    if query == "*":
        return True                         # same as universal matching
    if value == "":
        return False                        # a non-empty key never matches an empty value
    if vr in ("DA", "TM", "DT"):
        if "-" in query:
            return _range_match(vr, query, value)
        if vr == "TM":
            return _norm_time(query, False) == _norm_time(value, False)
        return query == value
    if vr in ("IS", "DS"):
        try:
            return float(query) == float(value)
        except ValueError:
            return query == value
    if vr == "UI":
        return value in query.split("\\")  # list of UID matching
    if vr == "PN" and pn_ci:
        query, value = query.lower(), value.lower()
    if vr in WILDCARD_VRS and ("*" in query or "?" in query):
        return _wild_regex(query).fullmatch(value) is not None
    return query == value


def match_value(keyword: str, query: str, value: str, pn_case_insensitive=False) -> bool:
    """Whether an entity's attribute value (decoded str, multi-values joined
    by backslash) matches a C-FIND key value (PS3.4 C.2.2.2):

    * "" (universal matching) and "*" match everything, empty values too;
    * single value matching: exact and case-sensitive, except PN with
      pn_case_insensitive (a "may" of the standard; literal otherwise);
    * wildcard matching on AE/CS/LO/LT/PN/SH/ST/UC/UR/UT: * any run of
      characters (not bytes), ? exactly one character;
    * range matching on DA/TM/DT: "A-B", "A-", "-B", inclusive; a partial TM
      upper bound covers its whole hour/minute ("10-10" is 10:00-10:59:59.999999);
    * single TM values compare after padding ("1015" == "101500");
    * list of UID matching: "uid1\\uid2" matches either;
    * IS/DS compare numerically;
    * a multi-valued entity (ModalitiesInStudy "CT\\MR") matches if any of its
      values matches; for ModalitiesInStudy a key "CT\\SR" matches if any of
      the key values matches any entity value (as PS3.4 allows for that key);
    * a non-empty key other than "*" never matches an empty entity value.
    Combined date-time matching and fuzzy matching are not modelled."""
    vr = _vr(keyword)
    if query == "":
        return True
    values = _split(value) if vr in ("CS", "UI") and "\\" in value else [value]
    queries = _split(query) if keyword in _COMPUTED_VR else [query]
    return any(_single_match(vr, q, v, pn_case_insensitive) for q in queries for v in values)


# ---- make_test_set ------------------------------------------------------------------

def make_test_set(outdir, seed: int = 0) -> DataSet:
    """Writes the test set into outdir (created if needed) and describes it.

    Fails loudly (RuntimeError) if a DCMTK tool fails or if a file read back
    does not hold what was planned."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".uncompressed-", dir=outdir))
    rng_root = np.random.SeedSequence(seed)
    planned = []
    try:
        for pi, patient in enumerate(PLAN, 1):
            for si, study in enumerate(patient[5], 1):
                for ri, series in enumerate(study[6], 1):
                    for ii, tsname in enumerate(series[3], 1):
                        rng = np.random.default_rng(rng_root.spawn(1)[0])
                        ds = _make_instance(seed, pi, si, ri, ii, patient, study, series, rng)
                        ts = TS_BY_NAME[tsname]
                        name = f"{patient[1]}_st{si}_se{ri}_{ii:02d}_{tsname}.dcm"
                        final = outdir / name
                        if ts in COMPRESSED:
                            src = tmp / name
                            _save(ds, src, EXPLICIT_LE)
                            run_tool(COMPRESS_CMD[ts] + [src, final])
                            src.unlink()
                        else:
                            _save(ds, final, ts)
                        planned.append((final, ts, record_from_dataset(ds)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    records = []
    for path, ts, want in planned:
        got_ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        got = record_from_dataset(got_ds)
        if got != want or got_ds.file_meta.TransferSyntaxUID != ts:
            raise RuntimeError(f"{path}: read back {got_ds.file_meta.TransferSyntaxUID} "
                               f"{got}, planned {ts} {want}")
        got["path"] = str(path)
        got["TransferSyntaxUID"] = ts
        records.append(got)
    return DataSet(outdir, records, seed)


# ---- make_bulk_set ------------------------------------------------------------------

@dataclass
class BulkSet:
    small_paths: List[Path] = field(default_factory=list)
    ct_paths: List[Path] = field(default_factory=list)
    small_bytes: int = 0
    ct_bytes: int = 0
    study_uids: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def paths(self) -> List[Path]:
        return self.small_paths + self.ct_paths

    @property
    def total_bytes(self) -> int:
        return self.small_bytes + self.ct_bytes

    @property
    def total_files(self) -> int:
        return len(self.small_paths) + len(self.ct_paths)


def _bulk_template(size, seed):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2"
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ShardPACS bulk generator"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ""
    ds.SeriesDescription = ""
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.SliceThickness = "1"
    ds.KVP = "120"
    ds.StudyInstanceUID = "1.2"
    ds.SeriesInstanceUID = "1.2"
    ds.StudyID = ""
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.ImagePositionPatient = ["-250", "-250", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = "1.2"
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [f"{500 / size:.4f}", f"{500 / size:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    rng = np.random.default_rng([seed, size])
    pixels = bytearray(_phantom(rng, size, size, 0, 4095, np.uint16)
                       .astype("<u2").tobytes())
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CT_IMAGE
    fm.MediaStorageSOPInstanceUID = "1.2"
    fm.TransferSyntaxUID = EXPLICIT_LE
    fm.ImplementationClassUID = UID_ROOT + ".72.0"
    fm.ImplementationVersionName = "SPBULKGEN"
    ds.file_meta = fm
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    return ds, pixels


def make_bulk_set(outdir, small: int = 2000, ct: int = 1000, studies: int = 20,
                  seed: int = 0) -> BulkSet:
    """Writes `small` 64x64 and `ct` 512x512 16-bit CT instances (explicit VR
    little endian) into outdir/small and outdir/ct, spread round-robin over
    `studies` studies (one patient per two studies); each study has one
    64x64 series (number 1) and one 512x512 series (number 2) when it gets
    instances of that kind. UIDs are BULK_ROOT.<seed>.<1 study|2 series|
    3 instance>...; PatientID BULK<seed>-<n>; names ASCII."""
    t0 = time.monotonic()
    outdir = Path(outdir)
    studies = max(1, int(studies))
    out = BulkSet()
    base = f"{BULK_ROOT}.{seed}"
    out.study_uids = [f"{base}.1.{s + 1}" for s in range(studies)]
    for kind, count, size, number in (("small", small, 64, 1), ("ct", ct, 512, 2)):
        if count <= 0:
            continue
        d = outdir / kind
        d.mkdir(parents=True, exist_ok=True)
        ds, pixels = _bulk_template(size, seed)
        paths = out.small_paths if kind == "small" else out.ct_paths
        nbytes = 0
        per_study = [0] * studies
        for i in range(count):
            s = i % studies
            per_study[s] += 1
            n = per_study[s]
            pat = s // 2 + 1
            ds.PatientName = f"Bulk^Patient{pat:03d}"
            ds.PatientID = f"BULK{seed}-{pat:03d}"
            ds.PatientBirthDate = f"19{50 + pat % 50:02d}0101"
            ds.StudyInstanceUID = out.study_uids[s]
            ds.StudyID = str(s + 1)
            ds.AccessionNumber = f"BULK{seed}-{s + 1:04d}"
            ds.StudyDescription = f"Bulk study {s + 1}"
            ds.StudyDate = f"2024{1 + s % 12:02d}{1 + s % 28:02d}"
            ds.SeriesDate = ds.StudyDate
            ds.SeriesInstanceUID = f"{base}.2.{s + 1}.{number}"
            ds.SeriesNumber = str(number)
            ds.SeriesDescription = f"{kind} {size}x{size}"
            ds.FrameOfReferenceUID = f"{base}.4.{s + 1}"
            uid = f"{base}.3.{s + 1}.{number}.{n}"
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = str(n)
            ds.ImagePositionPatient = ["-250", "-250", str(n)]
            ds.SliceLocation = str(n)
            # unique content per object; 12-bit values like the rest
            pixels[0:16] = struct.pack("<8H", number, seed & 0xFFF, (seed >> 12) & 0xFFF,
                                       (i >> 24) & 0xFFF, (i >> 12) & 0xFFF, i & 0xFFF,
                                       0, 0)
            ds.PixelData = bytes(pixels)
            path = d / f"{kind}_{s + 1:03d}_{n:05d}.dcm"
            ds.save_as(str(path), write_like_original=False)
            nbytes += path.stat().st_size
            paths.append(path)
        if kind == "small":
            out.small_bytes = nbytes
        else:
            out.ct_bytes = nbytes
    out.seconds = time.monotonic() - t0
    return out


# ---- findscu output and Part-10 helpers ---------------------------------------------

def response_to_dict(ds) -> Dict[str, str]:
    """keyword -> decoded str (multi-values joined by backslash) for every
    top-level element of a C-FIND response identifier; sequences are given
    as "<sequence of N items>"."""
    out = {}
    for elem in ds:
        key = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.VR == "SQ":
            out[key] = f"<sequence of {len(elem.value)} items>"
        else:
            out[key] = _value(ds, elem.keyword) if elem.keyword else str(elem.value)
    return out


def read_findscu_responses(directory) -> List[Dict[str, str]]:
    """Reads the rspNNNN.dcm files `findscu -X -od directory` wrote, in
    response order, as keyword -> decoded str dicts."""
    files = sorted(Path(directory).glob("rsp*.dcm"))
    return [response_to_dict(pydicom.dcmread(str(p), force=True)) for p in files]


def run_findscu(host, port, level, keys: Dict[str, str], outdir, aec="ANY-SCP",
                model="-S", extra=(), timeout=60) -> List[Dict[str, str]]:
    """Runs `findscu <model> -X -od outdir -k QueryRetrieveLevel=level -k K=V...`
    (TCP_NODELAY=1) and returns read_findscu_responses(outdir). outdir is
    emptied of old rsp files first. Non-ASCII key values are passed as they
    are (UTF-8 on the command line): also pass SpecificCharacterSet=ISO_IR 192."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for p in outdir.glob("rsp*.dcm"):
        p.unlink()
    args = ["findscu", model, "-aec", aec, *extra, "-X", "-od", outdir,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v not in (None, "") else k]
    args += [host, port]
    run_tool(args, timeout=timeout)
    return read_findscu_responses(outdir)


_DUMP_LINE = re.compile(
    rb"^\(([0-9a-fA-F]{4}),([0-9a-fA-F]{4})\) ([A-Za-z?]{2}) (.*\S)\s+#\s*(\d+|u/l),\s*(\S+)\s+(.+?)\s*$")
_LOG_PREFIX = re.compile(rb"^[FEWIDT]: ")
_CHARSET_CODEC = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
                  "ISO_IR 101": "iso8859_2", "ISO_IR 109": "iso8859_3",
                  "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5",
                  "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7",
                  "ISO_IR 138": "iso8859_8", "ISO_IR 148": "iso8859_9",
                  "ISO_IR 192": "utf-8", "GB18030": "gb18030", "GBK": "gbk"}


def _uid_from_dcmtk_name(name):
    """DCMTK dumps well-known UIDs by name ("=CTImageStorage"); pydicom's
    keywords are mostly the same names."""
    from pydicom.uid import UID_dictionary
    for uid, entry in UID_dictionary.items():
        if entry[-1] == name or entry[0].replace(" ", "") == name:
            return uid
    return "=" + name


def parse_findscu_output(text: Union[str, bytes]) -> List[Dict[str, str]]:
    """Parses the C-FIND response identifiers from findscu's log on stderr.

    findscu 3.6.7 logs each pending response's identifier unless -X is given
    (then only with +sr): at INFO level as "I: Find Response: N (Pending)"
    followed by a dcmdump-style dump (shown by default, no -v needed); with
    -d as "I: Received Find Response N", a DIMSE block and "D: Response
    Identifiers:" followed by the dump. The "Request Identifiers:" dump
    (-v/-d) is skipped. Both layouts are understood.

    Returns one dict keyword -> str per response, in order: values decoded
    with that response's Specific Character Set, trailing padding removed,
    "" for "(no value available)", multi-values joined by backslash, UIDs
    DCMTK shows by name ("=CTImageStorage") turned back into UIDs, top-level
    sequences as "<sequence>" (their items are skipped). Pass bytes when
    responses may hold non-UTF-8 text (e.g. subprocess without text=True);
    str input is re-encoded as UTF-8 with surrogateescape first.

    Limitations: DCMTK abbreviates values longer than 64 characters in dumps
    (they end in "..." here) and unknown private tags have no keyword (the
    tag "(gggg,eeee)" is the key). For exact values use `findscu -X` and
    read_findscu_responses()/run_findscu() instead."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    responses, current = [], None
    for raw in text.splitlines():
        line = _LOG_PREFIX.sub(b"", raw.rstrip(b"\r\n"))
        if re.match(rb"^Find Response: \d+ \(", line):
            current = {}
            responses.append(current)
            continue
        if line.startswith(b"Response Identifiers:"):
            if current is None or current:       # -d layout: a new response
                current = {}
                responses.append(current)
            continue
        if line.startswith(b"(") and current is not None:
            m = _DUMP_LINE.match(line)
            if not m:
                continue
            group, _elem, vr, val, _length, _vm, keyword = m.groups()
            key = keyword.decode("ascii", "replace")
            if group.lower() == b"fffe":
                continue
            if not re.match(r"^[A-Za-z][A-Za-z0-9]*$", key):    # "Unknown Tag & Data"
                key = f"({group.decode().upper()},{_elem.decode().upper()})"
            if vr == b"SQ":
                current[key] = "<sequence>"
            elif val.startswith(b"(no value available)"):
                current[key] = b""
            elif val.startswith(b"["):
                end = val.rfind(b"]")
                current[key] = val[1:end] if end > 0 else val[1:]
            else:
                current[key] = val
            continue
        if not line.strip() or line.startswith(b"#") or line.startswith(b" "):
            continue                              # blank, "# Dicom-Data-Set", nested items
        current = None                            # any other message ends a dump
    out = []
    for r in responses:
        cs = r.get("SpecificCharacterSet", b"")
        cs = cs.decode("ascii", "replace").strip() if isinstance(cs, bytes) else cs
        codec = _CHARSET_CODEC.get(cs.split("\\")[-1].strip(), "latin-1")
        rec = {}
        for k, v in r.items():
            if isinstance(v, bytes):
                v = v.decode(codec, "replace").rstrip(" \0")
                if v.startswith("="):
                    v = "\\".join(_uid_from_dcmtk_name(x[1:]) if x.startswith("=") else x
                                  for x in v.split("\\"))
            rec[k] = v
        out.append(rec)
    return out


def dataset_bytes_after_meta(path) -> bytes:
    """The bytes of a Part-10 file after its file meta information group,
    located with the group length (0002,0000); falls back to walking the
    group 0002 elements when the length is missing."""
    raw = Path(path).read_bytes()
    if raw[128:132] != b"DICM":
        raise ValueError(f"{path}: no DICM prefix")
    off = 132
    group, elem = struct.unpack_from("<HH", raw, off)
    if (group, elem) == (0x0002, 0x0000) and raw[off + 4:off + 6] == b"UL":
        length, = struct.unpack_from("<H", raw, off + 6)
        if length != 4:
            raise ValueError(f"{path}: bad (0002,0000) length {length}")
        group_length, = struct.unpack_from("<I", raw, off + 8)
        end = off + 12 + group_length
        if end > len(raw) or (end < len(raw) and
                              struct.unpack_from("<H", raw, end)[0] == 0x0002):
            raise ValueError(f"{path}: (0002,0000) = {group_length} is wrong")
        return raw[end:]
    while off + 8 <= len(raw):
        group, = struct.unpack_from("<H", raw, off)
        if group != 0x0002:
            break
        vr = raw[off + 4:off + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            length, = struct.unpack_from("<I", raw, off + 8)
            off += 12 + length
        else:
            length, = struct.unpack_from("<H", raw, off + 6)
            off += 8 + length
    return raw[off:]


# ---- command line -------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the ShardPACS DICOM test data.")
    ap.add_argument("outdir")
    ap.add_argument("--small", type=int, default=0, help="64x64 CT instances in the bulk set")
    ap.add_argument("--ct", type=int, default=0, help="512x512 CT instances in the bulk set")
    ap.add_argument("--studies", type=int, default=20, help="studies in the bulk set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-test-set", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.outdir)
    if not a.no_test_set:
        t0 = time.monotonic()
        ds = make_test_set(out / "testset", seed=a.seed)
        ds.to_json(out / "testset.json")
        size = sum(p.stat().st_size for p in ds.paths())
        print(f"test set: {len(ds)} files, {size} bytes, {len(ds.patients())} patients, "
              f"{len(ds.studies())} studies, {len(ds.series())} series, "
              f"{len(ds.transfer_syntaxes())} transfer syntaxes in {out / 'testset'} "
              f"({time.monotonic() - t0:.1f} s); records in {out / 'testset.json'}")
    if a.small or a.ct:
        b = make_bulk_set(out / "bulk", small=a.small, ct=a.ct, studies=a.studies, seed=a.seed)
        print(f"bulk set: {len(b.small_paths)} small ({b.small_bytes} bytes), "
              f"{len(b.ct_paths)} CT ({b.ct_bytes} bytes), {b.total_bytes} bytes in "
              f"{out / 'bulk'} ({b.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
