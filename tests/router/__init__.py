"""Tests of splitserve.router and splitserve.model.tokenizer."""
