// Verifies a JWT with an independent JOSE implementation (npm jose) against a JWKS URL.
// Usage: node verify.mjs <jwks-url> <issuer>, the JWT on stdin. Prints the verified header and
// claims as one JSON line, {"header": ..., "payload": ...}; exits 1 with the reason otherwise.
import { createRemoteJWKSet, jwtVerify } from 'jose';

const [jwksUrl, issuer] = process.argv.slice(2);
let jwt = '';
for await (const chunk of process.stdin) jwt += chunk;
try {
  const jwks = createRemoteJWKSet(new URL(jwksUrl));
  const { payload, protectedHeader } = await jwtVerify(jwt.trim(), jwks, {
    issuer,
    typ: 'at+jwt',
    algorithms: ['ES256', 'EdDSA', 'Ed25519', 'RS256'],
  });
  process.stdout.write(`${JSON.stringify({ header: protectedHeader, payload })}\n`);
} catch (error) {
  process.stderr.write(`verification failed: ${error.code || ''} ${error.message}\n`);
  process.exit(1);
}
