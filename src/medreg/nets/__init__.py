"""medreg.nets"""
