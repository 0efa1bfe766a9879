// Prints a new private key as PEM PKCS#8, made by Node's own crypto (not phantom-authz's).
// Usage: node keygen.mjs ES256|EdDSA|RS256
import { generateKeyPairSync } from 'node:crypto';

const kinds = {
  ES256: ['ec', { namedCurve: 'P-256' }],
  EdDSA: ['ed25519', {}],
  RS256: ['rsa', { modulusLength: 2048 }],
};
const [type, options] = kinds[process.argv[2]] ?? [];
if (!type) {
  process.stderr.write('usage: node keygen.mjs ES256|EdDSA|RS256\n');
  process.exit(2);
}
const { privateKey } = generateKeyPairSync(type, options);
process.stdout.write(privateKey.export({ type: 'pkcs8', format: 'pem' }));
