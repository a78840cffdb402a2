"""splitserve.decode_worker"""
