"""splitserve.prefill_worker"""
