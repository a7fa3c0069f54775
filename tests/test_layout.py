"""Row layouts address views without copies, and fall back to a copy only when they must."""

import torch

from rlfuse._layout import as_rows, row_layout


def _rows_via_layout(tensor):
    base, (rows, inner, stride_outer, stride_inner) = as_rows(tensor)
    flat = base.as_strided((base.untyped_storage().nbytes() // base.element_size(),), (1,), 0)
    start = base.storage_offset()
    vocab = tensor.shape[-1]
    out = [flat[start + (r // inner) * stride_outer + (r % inner) * stride_inner:][:vocab] for r in range(rows)]
    return torch.stack(out) if out else torch.empty(0, vocab)


def test_layouts_address_every_row():
    full = torch.randn(3, 5, 8)
    for view in [full, full[:, :-1], full[1:, 2:], full.transpose(0, 1), full[0], full[:, 3], full[:1]]:
        assert torch.equal(_rows_via_layout(view), view.reshape(-1, 8)), view.shape


def test_shifted_view_needs_no_copy():
    full = torch.randn(2, 6, 10)
    assert row_layout(full[:, :-1]) == (10, 5, 60, 10)


def test_three_unmergeable_leading_dims_fall_back_to_copy():
    odd = torch.randn(2, 3, 4, 5, 6)[:, :, ::2].permute(1, 0, 2, 3, 4)
    assert row_layout(odd[..., :6]) is None
    base, layout = as_rows(odd)
    assert base.is_contiguous() and layout == (60, 60, 0, 6)


def test_strided_vocab_falls_back_to_copy():
    assert row_layout(torch.randn(4, 20)[:, ::2]) is None
