<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** A method that promises delivery found no such client or connection. */
final class ClientNotFoundException extends WsboardException
{
}
