"""Fixtures shared by every test folder."""

from tests.support.clip_tokenizer import clip_tokenizer_dir
from tests.support.servers import http_server, s3_auth_server, s3_server

__all__ = ["clip_tokenizer_dir", "http_server", "s3_auth_server", "s3_server"]
