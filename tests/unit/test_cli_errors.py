"""The command line reports bad input as one line, also when it was raised inside a DataLoader worker."""

import pytest
from torch.utils.data import DataLoader, Dataset

from bigmodel.cli.main import one_line


class _Unreadable(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise ValueError("s3://bucket/x.tar: 403 Forbidden (check AWS_ACCESS_KEY_ID)")


def test_an_error_from_a_loader_worker_is_reported_as_its_own_one_line():
    with pytest.raises(ValueError) as caught:
        next(iter(DataLoader(_Unreadable(), num_workers=1)))
    assert "\n" in str(caught.value), "torch re-raises a worker's error with the worker's traceback"
    assert one_line(caught.value) == "s3://bucket/x.tar: 403 Forbidden (check AWS_ACCESS_KEY_ID)"


def test_an_ordinary_error_is_left_as_it_is():
    assert one_line(ValueError("model.fusin: unknown key")) == "model.fusin: unknown key"
