"""medreg.viz"""
