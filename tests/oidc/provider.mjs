// A real OAuth server for phantom-authz's integration tests: npm oidc-provider (OpenID certified)
// on a free loopback port, with client-credentials tokens, RFC 7662 introspection, RFC 7009
// revocation and discovery metadata. Prints one JSON line, {"issuer": ..., "port": ...}, once it
// listens, then serves until killed. PROVIDER_PORT fixes the port (a free one when unset).
//
// Clients (secrets are test-only):
//   app       client_secret_basic, client_credentials, scopes "read write": gets access tokens
//   gw-basic  introspects with client_secret_basic
//   gw-post   introspects with client_secret_post
//   gw-jwt    introspects with private_key_jwt; its public key, with its RFC 7638 thumbprint as
//             `kid`, is read from the PEM private key file PROVIDER_CLIENT_KEY_FILE names
// ACCESS_TOKEN_TTL sets the access tokens' lifetime in seconds (600 when unset).
import { createServer } from 'node:http';
import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { calculateJwkThumbprint } from 'jose';
import Provider from 'oidc-provider';

const server = createServer();
await new Promise((resolve) => {
  server.listen(Number(process.env.PROVIDER_PORT || 0), '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const clients = [
  {
    client_id: 'app',
    client_secret: 'app-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'read write',
  },
  ...[
    ['gw-basic', 'client_secret_basic'],
    ['gw-post', 'client_secret_post'],
  ].map(([client_id, method]) => ({
    client_id,
    client_secret: `${client_id}-secret`,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: method,
  })),
];
const keyFile = process.env.PROVIDER_CLIENT_KEY_FILE;
if (keyFile) {
  const jwk = createPublicKey(readFileSync(keyFile)).export({ format: 'jwk' });
  // Registered under its RFC 7638 thumbprint, the `kid` phantom-authz puts in its assertions.
  jwk.kid = await calculateJwkThumbprint(jwk);
  clients.push({
    client_id: 'gw-jwt',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'private_key_jwt',
    jwks: { keys: [jwk] },
  });
}

const provider = new Provider(issuer, {
  clients,
  scopes: ['read', 'write'],
  features: {
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    devInteractions: { enabled: false },
  },
  ttl: { ClientCredentials: Number(process.env.ACCESS_TOKEN_TTL || 600) },
});
server.on('request', provider.callback());
process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
