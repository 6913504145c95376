"""Persona space numerics: PCA, Assistant Axis, projections, files, trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.interp.space import (
    PersonaSpace,
    assistant_axis,
    checkpoint_coordinates,
    count_passing,
    default_vector,
    fit_persona_space,
    load_persona_space,
    role_vector,
    save_persona_space,
)

R, ROWS, H = 12, 5, 32


def _data(seed: int = 0, default_side: float = 1.0):
    """Role vectors with a few dominant directions (distinct variances) and a default vector."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))[0][:, :4].T  # [4, H]
    scales = torch.tensor([6.0, 3.0, 1.5, 0.7], dtype=torch.float64)
    coef = torch.randn(R, ROWS, 4, generator=g, dtype=torch.float64) * scales
    offset = torch.randn(ROWS, H, generator=g, dtype=torch.float64)
    roles = offset + coef @ basis + 0.05 * torch.randn(R, ROWS, H, generator=g, dtype=torch.float64)
    default = roles.mean(0) + default_side * 4.0 * basis[0] + 0.5 * basis[1]
    return {f"role{i:02d}": roles[i].float() for i in range(R)}, default.float()


def _centred(vecs: dict, row: int) -> np.ndarray:
    x = np.stack([vecs[k][row].double().numpy() for k in sorted(vecs)])
    return x - x.mean(0)


@pytest.mark.parametrize("side", [1.0, -1.0])
def test_pca_matches_svd_and_pc1_sign(side):
    vecs, default = _data(default_side=side)
    space = fit_persona_space(vecs, default, layer=2)
    xc = _centred(vecs, 2)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ratio = s ** 2 / (s ** 2).sum()
    k = space.explained_variance_ratio.numel()
    assert k == R - 1  # centred roles span R-1 directions
    np.testing.assert_allclose(space.explained_variance_ratio.numpy(), ratio[:k], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(space.explained_variance.numpy(), (s ** 2 / (R - 1))[:k], rtol=1e-4)
    for i in range(4):  # distinct singular values: components agree up to sign
        assert abs(float(space.components[i].double().numpy() @ vt[i])) == pytest.approx(1.0, abs=1e-4)
    # PC1 sign: the default Assistant has a positive coordinate, on either side of the roles
    assert float(space.default_coords[0]) > 0
    np.testing.assert_allclose(space.loadings.numpy(), (xc @ space.components.double().numpy().T),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(space.project(space.role_vectors).numpy(), space.loadings.numpy(), atol=1e-3)
    cum = np.cumsum(ratio)
    for q in (0.7, 0.8, 0.9):
        assert space.pcs_for(q) == int(np.argmax(cum >= q)) + 1
    assert space.pcs_for_levels == {str(q): space.pcs_for(q) for q in (0.7, 0.8, 0.9)}


def test_axis_formula_and_default_above_role_mean():
    vecs, default = _data(1)
    space = fit_persona_space(vecs, default, layer=3)
    stacked = torch.stack([vecs[k] for k in sorted(vecs)]).double()
    expected = default.double() - stacked.mean(0)
    torch.testing.assert_close(space.axis.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(assistant_axis(stacked, default), expected)
    for layer in range(ROWS):  # by construction default - mean projects to |axis| > 0
        gap = space.axis_projection(default[layer], layer) - space.axis_projection(stacked.mean(0)[layer], layer)
        assert float(gap) == pytest.approx(float(space.axis[layer].norm()), rel=1e-4)
        assert float(gap) > 0


def test_axis_pc1_cosine_per_layer_matches_numpy():
    vecs, default = _data(2)
    space = fit_persona_space(vecs, default, layer=1)
    for row in range(ROWS):
        xc = _centred(vecs, row)
        pc1 = np.linalg.svd(xc, full_matrices=False)[2][0]
        mean = np.stack([vecs[k][row].double().numpy() for k in vecs]).mean(0)
        if (default[row].double().numpy() - mean) @ pc1 < 0:
            pc1 = -pc1
        axis = space.axis[row].double().numpy()
        assert float(space.axis_pc1_cos[row]) == pytest.approx(axis @ pc1 / np.linalg.norm(axis), abs=1e-4)
    # the per-layer PC1 at the PCA layer is scikit-learn's (sign-fixed) component 0
    a = space.axis[1].double()
    assert float(space.axis_pc1_cos[1]) == pytest.approx(
        float(a @ space.components[0].double() / a.norm()), abs=1e-4)
    assert float(space.axis_pc1_cos[1]) > 0.5  # the default sits along PC1 in this data


def test_layer_subset_rows_map_to_hidden_state_indices():
    vecs, default = _data(3)
    sub = {k: v[[1, 4]] for k, v in vecs.items()}
    space = fit_persona_space(sub, default[[1, 4]], layer=4, layers=[7, 4])
    full = fit_persona_space(vecs, default, layer=4)
    torch.testing.assert_close(space.explained_variance_ratio, full.explained_variance_ratio)
    assert space.row(4) == 1
    with pytest.raises(InputError):
        space.row(3)
    with pytest.raises(InputError):
        fit_persona_space(sub, default[[1, 4]], layer=2, layers=[7, 4])


def test_role_vector_threshold_and_min_count():
    acts = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)
    scores = [3, 2, None, 3, 3.0]
    v = role_vector(acts, scores, threshold=3, min_count=3)
    torch.testing.assert_close(v, acts[[0, 3, 4]].mean(0))
    assert count_passing(scores) == 3
    assert role_vector(acts, scores, threshold=3, min_count=4) is None  # dropped
    assert role_vector(acts, [None] * 5, threshold=0, min_count=1) is None
    torch.testing.assert_close(default_vector(acts), acts.mean(0))
    with pytest.raises(InputError):
        role_vector(acts, scores[:4])
    with pytest.raises(InputError):
        fit_persona_space({"a": acts[0]}, acts[1], layer=0)


def test_save_load_roundtrip(tmp_path):
    vecs, default = _data(4)
    space = fit_persona_space(vecs, default, layer=2)
    path = tmp_path / "space.safetensors"
    save_persona_space(path, space, {"model": "tiny@x", "dropped": {"ghost": 3}})
    back = load_persona_space(path)
    assert isinstance(back, PersonaSpace)
    assert back.roles == space.roles and back.layer == 2 and back.layers == list(range(ROWS))
    for name in ("components", "loadings", "axis", "default", "mean", "axis_pc1_cos", "explained_variance_ratio"):
        torch.testing.assert_close(getattr(back, name), getattr(space, name))
    assert back.metadata["model"] == "tiny@x" and back.metadata["dropped"] == {"ghost": 3}
    with pytest.raises(InputError):
        load_persona_space(tmp_path / "missing.safetensors")


def test_checkpoint_coordinates_reference_and_flat_trajectory():
    vecs, default = _data(5)
    space = fit_persona_space(vecs, default, layer=2)
    rec = checkpoint_coordinates(space, vecs, default, n_pcs=3)
    got = np.array([rec["roles"][n]["pcs"] for n in space.roles])
    np.testing.assert_allclose(got, space.loadings[:, :3].numpy(), atol=1e-3)
    assert rec["axis_cos_reference"] == pytest.approx(1.0, abs=1e-5)
    assert rec["axis_gap"] == pytest.approx(float(space.axis[2].norm()), rel=1e-4)
    assert rec["default"]["pcs"][0] > 0
    # identical checkpoints give identical points: a flat trajectory
    again = checkpoint_coordinates(space, {k: v.clone() for k, v in vecs.items()}, default.clone(), n_pcs=3)
    assert again == rec
    # a moved default moves only the default's coordinates
    shifted = checkpoint_coordinates(space, vecs, default - 2 * space.axis, n_pcs=3)
    assert shifted["roles"] == rec["roles"]
    assert shifted["default"]["axis"] < rec["default"]["axis"]
    partial = checkpoint_coordinates(space, {k: vecs[k] for k in space.roles[:3]}, default)
    assert partial["missing_roles"] == space.roles[3:]
