"""Tests of splitserve.kvtransfer."""
