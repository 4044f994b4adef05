"""magitrain: training framework for daVinci-MagiHuman."""
