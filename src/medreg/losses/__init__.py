"""medreg.losses"""
