"""splitserve.deploy"""
