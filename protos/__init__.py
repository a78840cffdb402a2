"""splitserve.protos"""
