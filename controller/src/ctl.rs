//! meridianctl (to be filled)
