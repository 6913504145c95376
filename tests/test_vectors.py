import re

import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.interp.vectors import (
    FilterThresholds,
    export_pt,
    filter_pairs,
    import_pt,
    load_vectors,
    mean_difference,
    require_pairs,
    save_vectors,
)


def _rec(pol, ii, qi, answer="an answer"):
    return {"id": f"{pol}-{ii}-{qi}", "polarity": pol, "instruction_idx": ii, "question_idx": qi,
            "sample_idx": 0, "answer": answer}


def test_filter_keeps_only_aligned_pairs_meeting_every_threshold():
    recs = [_rec(p, 0, q) for p in ("pos", "neg") for q in range(5)] + [_rec("pos", 1, 0)]
    j = {
        "pos-0-0": {"trait": 80, "coherence": 90}, "neg-0-0": {"trait": 10, "coherence": 90},  # pass
        "pos-0-1": {"trait": 49, "coherence": 90}, "neg-0-1": {"trait": 10, "coherence": 90},  # pos too low
        "pos-0-2": {"trait": 80, "coherence": 90}, "neg-0-2": {"trait": 50, "coherence": 90},  # neg not < 50
        "pos-0-3": {"trait": 80, "coherence": 40}, "neg-0-3": {"trait": 10, "coherence": 90},  # incoherent
        "pos-0-4": {"trait": None, "coherence": 90}, "neg-0-4": {"trait": 10, "coherence": 90},  # refusal
        "pos-1-0": {"trait": 99, "coherence": 99},  # no neg partner
    }
    pairs, counts = filter_pairs(recs, j, FilterThresholds())
    assert [(a["id"], b["id"]) for a, b in pairs] == [("pos-0-0", "neg-0-0")]
    assert counts == {"pairs_total": 5, "pairs_passed": 1, "pairs_filtered": 4}


def test_require_pairs_message_says_how_many_and_which_threshold():
    with pytest.raises(InputError, match=r"only 2 of 40 .*filter\.min_pairs=3.*filter\.coherence_min"):
        require_pairs(2, 40, FilterThresholds(min_pairs=3), "evil")
    require_pairs(3, 40, FilterThresholds(min_pairs=3), "evil")


def test_mean_difference_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    pos = {"response_avg": torch.randn(6, 5, 8, generator=g)}
    neg = {"response_avg": torch.randn(4, 5, 8, generator=g)}
    vec = mean_difference(pos, neg)
    torch.testing.assert_close(vec["response_avg"], pos["response_avg"].mean(0) - neg["response_avg"].mean(0))
    save_vectors(tmp_path / "v.safetensors", vec, {"trait": "evil", "n_pairs": 4})
    back, meta = load_vectors(tmp_path / "v.safetensors")
    torch.testing.assert_close(back["response_avg"], vec["response_avg"])
    assert meta["trait"] == "evil" and meta["n_pairs"] == "4" and "hidden_states[L]" in meta["layer_convention"]
    files = export_pt(back, tmp_path / "pt", "evil")
    assert files[0].name == "evil_response_avg_diff.pt"
    assert torch.load(files[0], weights_only=True).shape == (5, 8)
    torch.testing.assert_close(import_pt(files)["response_avg"], vec["response_avg"])


def test_import_rejects_non_tensor_files(tmp_path):
    bad = tmp_path / "x_response_avg_diff.pt"
    torch.save({"a": torch.zeros(2)}, bad)
    with pytest.raises(InputError, match="2-D tensor"):
        import_pt([bad])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_import_refuses_pickles_that_run_code_and_bad_tensors(tmp_path):
    evil = tmp_path / "evil_response_avg_diff.pt"
    torch.save(_RunsCode(tmp_path / "pwned"), evil)
    with pytest.raises(InputError) as info:
        import_pt([evil])
    msg = str(info.value)
    assert msg.startswith(f"{evil}: not a tensor file loadable with weights_only=True (Trying to load unsupported "
                          "GLOBAL posix.system") and "\n" not in msg
    assert not (tmp_path / "pwned").exists()
    for bad, expected in [(torch.zeros(2, 5, 8), "shape [2, 5, 8], expected [layers, hidden]"),
                          (torch.ones(5, 8, dtype=torch.int32), "dtype int32, expected floating point")]:
        torch.save(bad, evil)
        with pytest.raises(InputError, match=re.escape(f"{evil}: response_avg: {expected}")):
            import_pt([evil])


def test_export_checks_names_before_writing(tmp_path):
    vec = {"response_avg": torch.zeros(5, 8), "../up": torch.zeros(5, 8)}
    with pytest.raises(InputError, match=r"^v.safetensors: tensor '../up' is not a usable name"):
        export_pt(vec, tmp_path / "out", "evil", source="v.safetensors")
    with pytest.raises(InputError, match=r"^trait '/abs' is not a usable name"):
        export_pt({"response_avg": torch.zeros(5, 8)}, tmp_path / "out", "/abs")
    assert not (tmp_path / "out").exists()
