// Anchor translation unit for a shared torch precompiled header.
