"""GraphQL: the read layer over users, products and orders (POST /graphql, the explorer,
the SDL)."""
