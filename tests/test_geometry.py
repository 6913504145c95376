import pytest
import torch

from persona_ops.interp.geometry import (
    combine,
    cosine_matrix,
    from_block_indexed,
    norms,
    our_layer,
    pearson,
    to_block_indexed,
)


def test_layer_converters_roundtrip():
    vec = torch.randn(5, 8)
    blocks = to_block_indexed(vec)
    assert blocks.shape == (4, 8) and torch.equal(blocks[0], vec[1])  # their block 0 = our layer 1
    torch.testing.assert_close(from_block_indexed(blocks, vec[0]), vec)
    assert our_layer("assistant-axis", 19) == 20 and our_layer("easysteer", 19) == 20
    assert our_layer("persona_vectors", 20) == 20
    with pytest.raises(ValueError):
        our_layer("nnsight", 3)


def test_cosine_matrix_and_norms():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, -1.0]])
    sims = cosine_matrix({"a": a, "b": b})
    assert sims.shape == (2, 2, 2)
    torch.testing.assert_close(sims[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(cosine_matrix({"a": a, "b": b}, layer=1), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    torch.testing.assert_close(norms(a), torch.tensor([1.0, 2.0]))


def test_combine_and_pearson():
    v = {"x": torch.ones(2, 3), "y": torch.full((2, 3), 2.0)}
    torch.testing.assert_close(combine({"x": 1.0, "y": -0.5}, v), torch.zeros(2, 3))
    unit = combine({"y": 1.0}, v, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)


def test_geometry_report_writes_html_and_pngs(tmp_path):
    from persona_ops.reports.geometry import vector_geometry_report

    vecs = {"evil": torch.randn(4, 8), "kind": torch.randn(4, 8)}
    files = vector_geometry_report(vecs, tmp_path, layer=2)
    assert "plotly" in files["html"].read_text()[:100000].lower()
    for key in ("cosine", "norms"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (files["html"].stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode
