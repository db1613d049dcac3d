"""The fusion context: which image each token reads, and per-row state that follows its rows."""

import torch

from polymodal.fusion.context import FusionState, current

IMAGE, AUDIO = 9, 8


def state(rows=2, per_image=1, media=None):
    return FusionState(media, torch.zeros(rows, dtype=torch.long), [IMAGE, AUDIO], IMAGE, per_image)


def test_a_token_reads_the_latest_image_at_or_before_it_and_none_before_the_first():
    ids = torch.tensor([[1, 9, 2, 3, 9, 4], [1, 2, 3, 4, 5, 9]])
    with state().call(ids) as call:
        assert current() is call
        assert call.media_index.tolist() == [[-1, 0, 0, 0, 1, 1], [-1, -1, -1, -1, -1, 0]]
        assert call.media_mask.tolist() == (ids == IMAGE).tolist()
    assert current() is None


def test_images_counted_in_earlier_calls_carry_on_and_inline_runs_count_as_one_image():
    rows = state(rows=1, per_image=2)
    with rows.call(torch.tensor([[1, 9, 9, 2]])) as call:
        assert call.media_index.tolist() == [[-1, 0, 0, 0]]
    with rows.call(torch.tensor([[9, 9, 3]])) as call:  # the next call: a second image
        assert call.media_index.tolist() == [[1, 1, 1]]
    assert rows.seen.tolist() == [4]


def test_in_branches_a_token_reads_only_its_own_branch_or_the_prefix():
    ids = torch.tensor([[1, 2, 9, 3, 4, 5]])  # prefix [1, 2], branch 1 [9, 3], branch 2 [4, 5]: no image
    branches = torch.tensor([[0, 0, 1, 1, 2, 2]])
    with state(rows=1).call(ids, branch_ids=branches) as call:
        assert call.media_index.tolist() == [[-1, -1, 0, 0, -1, -1]]


def test_rows_follow_selection_moves_and_joins_with_padding_to_the_most_images():
    media = torch.arange(2 * 1 * 3 * 4, dtype=torch.float).view(2, 1, 3, 4)  # [R, M, K, D]
    rows = state(media=media)
    rows.cache["keys"] = media.clone()
    rows.select_rows(torch.tensor([1, 1, 0]))
    assert torch.equal(rows.media[0], media[1]) and torch.equal(rows.cache["keys"][2], media[0])
    joining = state(rows=1, media=torch.ones(1, 2, 3, 4))
    joining.cache["keys"] = torch.ones(1, 2, 3, 4)
    rows.put_row(3, joining)  # one past the last row: joins, two images pad everyone's axis 1
    assert rows.media.shape == (4, 2, 3, 4) and torch.equal(rows.media[3], torch.ones(2, 3, 4))
    assert torch.equal(rows.media[0, 1], torch.zeros(3, 4))
    rows.move_row(3, 0)
    rows.truncate(3)
    assert torch.equal(rows.media[0], torch.ones(2, 3, 4)) and rows.rows == 3
    text_only = state(rows=1)  # a row without the cached tensor: it is recomputed, never read as zeros
    rows.put_row(1, text_only)
    assert "keys" not in rows.cache and rows.media_count.tolist()[1] == 0
