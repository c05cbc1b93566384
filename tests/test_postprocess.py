"""extras/postprocess.py: connected components, hole filling, the largest lesion (--post), against
a plain BFS reference. evaluate.py's end-to-end --post test stays in test_evaluate.py."""
import numpy as np
from hypothesis import given, settings, strategies as st

from extras import postprocess


def _bfs_components(mask):
    """Reference: the components of a bool mask as a set of frozensets of (y, x), by plain BFS."""
    seen, comps = set(), set()
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if (y, x) in seen:
            continue
        stack, comp = [(y, x)], set()
        seen.add((y, x))
        while stack:
            cy, cx = stack.pop()
            comp.add((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    stack.append((ny, nx))
        comps.add(frozenset(comp))
    return comps


masks_2d = st.integers(1, 14).flatmap(lambda h: st.integers(1, 14).flatmap(
    lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
        lambda v: np.array(v, bool).reshape(h, w))))


@settings(max_examples=150, deadline=None)
@given(masks_2d)
def test_label_finds_exactly_the_connected_components(mask):
    labels = postprocess.label(mask)
    assert ((labels > 0) == mask).all()
    found = {frozenset(zip(*np.nonzero(labels == k))) for k in np.unique(labels[labels > 0])}
    assert found == _bfs_components(mask)


@settings(max_examples=100, deadline=None)
@given(masks_2d)
def test_postprocess_fill_and_largest(mask):
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)
    filled = postprocess.postprocess(prob, 0.5, "fill") > 0.5
    assert (filled >= mask).all()  # only adds
    holes = postprocess.label(~filled)  # every background region left touches the border
    border = set(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    assert set(np.unique(holes[holes > 0])) <= border
    largest = postprocess.postprocess(prob, 0.5, "largest") > 0.5
    assert (largest <= mask).all()  # only removes
    comps = _bfs_components(mask)
    assert len(_bfs_components(largest)) == min(1, len(comps))
    assert largest.sum() == max((len(c) for c in comps), default=0)
    both = postprocess.postprocess(prob, 0.5, "fill+largest")
    assert np.array_equal(postprocess.postprocess(both, 0.5, "fill+largest"), both)  # idempotent
    assert np.array_equal(postprocess.postprocess(prob, 0.5, "none"), prob)
