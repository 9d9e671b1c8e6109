"""Reader study: randomisation and blinding, de-identified scores CSV, separate key, resume after interruption."""
import csv
from collections import Counter

import pytest

from MRSISuperResolutionLib import readerstudy as rs


def sources(patients=("Doe^John", "Roe^Jane"), metabolites=("NAA", "tCho", "Cr"), slices=range(4)):
    return [rs.PairSource(p, m, k, f"vtkMRMLScalarVolumeNode{p}{m}zf", f"vtkMRMLScalarVolumeNode{p}{m}sr")
            for p in patients for m in metabolites for k in slices]


def full_scores(value="70"):
    return {side: {item: value for item in rs.ITEMS} for side in rs.SIDES}


def test_plan_is_a_seeded_permutation_with_balanced_random_sides():
    src = sources()
    plan = rs.plan_trials(src, study_seed=1, reader_seed=2)
    assert Counter(t.source for t in plan) == Counter(src)  # every pair exactly once
    assert len(plan) == len(src) and len({t.case_id for t in plan}) == len(src)
    assert [t.source for t in plan] != src  # shuffled
    sides = Counter(t.sr_side for t in plan)
    assert 6 <= sides["A"] <= 18  # 24 fair coin flips: both sides used, neither dominates
    assert plan == rs.plan_trials(src, study_seed=1, reader_seed=2)  # reproducible
    other = rs.plan_trials(src, study_seed=1, reader_seed=3)
    assert [t.case_id for t in other] != [t.case_id for t in plan]  # another reader, another order
    # the same pair keeps its de-identified id for every reader of the study
    assert {t.source: t.case_id for t in other} == {t.source: t.case_id for t in plan}


def test_case_ids_do_not_reveal_patient_or_order_of_sources():
    ids = rs.case_ids(sources(), study_seed=5)
    by_patient = [ids[s] for s in sources() if s.patient == "Doe^John"]
    assert by_patient != sorted(by_patient)  # ids are not assigned in patient/metabolite/slice order
    assert all(cid.startswith("C") and "Doe" not in cid for cid in ids.values())


def test_trial_sides_map_to_methods_and_refs():
    src = sources()[0]
    t = rs.Trial("C0001", src, "B")
    assert (t.method("A"), t.method("B")) == ("LR", "SR")
    assert (t.ref("A"), t.ref("B")) == (src.low_ref, src.sr_ref)
    assert t.item_labels()[0] == "NAA conspicuity"
    with pytest.raises(ValueError, match="side"):
        t.method("C")


def test_scores_are_deidentified_and_the_key_is_separate(tmp_path):
    session = rs.ReaderSession.start(tmp_path, "Dr. Who", sources(), study_seed=1, reader_seed=9)
    trial = session.next_trial()
    session.record(trial.case_id, full_scores("90"))
    scores_text = session.scores_path.read_text()
    for secret in ("Doe", "Roe", "NAA", "tCho", "SR", "LR", "vtkMRML"):
        assert secret not in scores_text
    rows = list(csv.DictReader(session.scores_path.open()))
    assert [r["image"] for r in rows] == ["A", "B"]
    assert rows[0]["reader"] == "Dr_Who" and rows[0]["case_id"] == trial.case_id
    assert set(rows[0]) == set(rs.SCORE_COLUMNS)
    key = list(csv.DictReader(session.key_path.open()))
    assert session.key_path != session.scores_path and len(key) == len(sources())
    entry = next(r for r in key if r["case_id"] == trial.case_id)
    assert (entry["patient"], entry["sr_side"]) == (trial.source.patient, trial.sr_side)
    unblinded = session.unblinded()
    assert {r["method"] for r in unblinded} == {"SR", "LR"}
    assert all(r["patient"] == trial.source.patient for r in unblinded)


def test_an_interrupted_reading_resumes_where_it_stopped(tmp_path):
    src = sources(slices=range(2))
    first = rs.ReaderSession.start(tmp_path, "r1", src, study_seed=3, reader_seed=4)
    done = []
    for _ in range(3):
        t = first.next_trial()
        first.record(t.case_id, full_scores())
        done.append(t.case_id)
    with first.scores_path.open("a") as fh:
        fh.write(f"r1,{first.trials[3].case_id},A,70,70")  # crash while writing the next trial
    again = rs.ReaderSession.start(tmp_path, "r1", [], study_seed=0)  # key exists: sources are not needed
    assert [t.case_id for t in again.trials] == [t.case_id for t in first.trials]
    assert again.progress() == (3, len(src))
    assert again.next_trial().case_id == first.trials[3].case_id
    again.record(first.trials[3].case_id, full_scores("NA"))  # the partial row stays alone and ignored
    assert again.progress() == (4, len(src))
    assert rs.ReaderSession.resume(tmp_path, "r1").completed_ids() >= set(done)
    with pytest.raises(ValueError, match="already scored"):
        again.record(done[0], full_scores())


def test_scores_must_be_complete_and_on_the_scale(tmp_path):
    session = rs.ReaderSession.start(tmp_path, "r", sources(slices=[0]), study_seed=1, reader_seed=1)
    cid = session.trials[0].case_id
    bad = full_scores()
    bad["B"]["lesion"] = "60"
    with pytest.raises(ValueError, match="lesion"):
        session.record(cid, bad)
    missing = full_scores()
    del missing["A"]["sharpness"]
    with pytest.raises(ValueError, match="sharpness"):
        session.record(cid, missing)
    with pytest.raises(ValueError, match="image B"):
        session.record(cid, {"A": full_scores()["A"]})
    with pytest.raises(ValueError, match="unknown case"):
        session.record("C9999", full_scores())
    assert session.progress() == (0, len(session.trials))
    assert rs.validate_scores(full_scores("na"))["A"]["lesion"] == "NA"


def test_bad_plans_and_names():
    with pytest.raises(ValueError, match="at least one"):
        rs.plan_trials([], study_seed=0, reader_seed=0)
    with pytest.raises(ValueError, match="twice"):
        rs.plan_trials(sources()[:1] * 2, study_seed=0, reader_seed=0)
    with pytest.raises(ValueError, match="reader name"):
        rs.reader_slug(" ./ ")
