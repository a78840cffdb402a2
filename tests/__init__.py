"""splitserve.tests"""
