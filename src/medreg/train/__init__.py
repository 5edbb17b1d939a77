"""medreg.train"""
