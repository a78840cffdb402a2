"""splitserve.kvtransfer"""
